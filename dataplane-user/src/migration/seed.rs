//! Seeding a standby on this host from the service's serving instance: what
//! a host a service migrated to does when the service had a standby on its
//! source, and what `service.standby` asks for. A standby started afresh
//! from the service's command would have none of the state the service
//! built from its inputs so far, so it is restored from a checkpoint of the
//! serving instance, as a migration's destination restores one:
//!
//! 1. the standbys' dataplane takes the service's flows under this host's
//!    id, holding (and logging) every input it gets, and this host's
//!    dataplane starts mirroring every input of them to it;
//! 2. the serving instance is checkpointed as a leave-running migration's
//!    source checkpoints it: its inputs held, its socket drained, dumped
//!    left running at position S, the held inputs given back;
//! 3. the image is restored into the standbys' namespace, and that
//!    instance gets the inputs after S that its dataplane held, in order,
//!    and from then on every input as it comes.
//!
//! Every input after S reaches the standby through the mirror to it, which
//! copies only what this host takes on its service interface: a seeding
//! right after a migration waits until no input has come forwarded by the
//! former source for a while. Anything that fails undoes the seeding; the
//! serving instance is never left held.
use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use dataplane_common::{
    FLOW_STANDBY, FlowConfig, FlowKey, GATE_HOLD_ALL, Gate, OUTPUT_MUTE, RECORD_MIRRORED,
    TAG_COUNTED,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    criu::{Criu, RestoreRequest, open_netns},
    host::tasks::{self, Identity},
    kernel::{
        flow,
        loader::Dataplane,
        logs::{Records, Subscription, Tap},
    },
    migration::{
        error::Cause,
        hold::Budget,
        instance::{Checkpointed, Taken},
        protocol::SUBSCRIPTION_CAPACITY,
    },
    registry::Registry,
    service::Service,
    standby::{STANDBY_END, StandbyHost},
};

/// A request for a standby of a registered service; the answer, if asked
/// for, is the standby's pid or why there is none.
pub struct StandbyRequest {
    pub service: String,
    /// Right after a migration to this host: wait for the former source to
    /// stop forwarding inputs first.
    pub after_migration: bool,
    pub answer: Option<oneshot::Sender<Result<u32, String>>>,
}

/// What seeding standbys on this host needs of the daemon.
pub struct Seeder {
    pub standby: Option<StandbyHost>,
    pub pin_root: PathBuf,
    /// The service-facing interface (the serving instance's replays).
    pub interface: String,
    /// Where inputs forwarded by a former source arrive.
    pub peer_interface: Option<String>,
    pub criu: Criu,
    /// The input log's reader.
    pub inputs: Arc<Tap>,
    /// The standbys' dataplane's input log's reader (with `standby`).
    pub standby_inputs: Option<Arc<Tap>>,
    pub services: Arc<Registry>,
    /// Where the checkpoint goes (removed after).
    pub images_dir: PathBuf,
    /// The CPUs standbys run on; empty: any.
    pub cpus: Vec<usize>,
}

/// Forwarded inputs: none for this long, and the former source has let go.
const FORWARDED_QUIET: Duration = Duration::from_millis(50);
/// How long forwarded inputs may keep coming before the seeding is given up.
const FORWARDED_LIMIT: Duration = Duration::from_secs(5);
/// How long a seeding waits for a migration of the service to release its
/// log subscription.
const SUBSCRIBE_LIMIT: Duration = Duration::from_secs(5);

impl Seeder {
    /// Serves standby requests one at a time until the daemon drops the
    /// sender.
    pub async fn serve(self, mut requests: mpsc::UnboundedReceiver<StandbyRequest>) {
        while let Some(request) = requests.recv().await {
            let name = request.service.clone();
            let start = Instant::now();
            let outcome = self.give_standby(&request).await;
            match &outcome {
                Ok(pid) => tracing::info!(service = %name, pid,
                    ms = start.elapsed().as_millis() as u64, "seeded a standby"),
                Err(e) => tracing::warn!(service = %name, "no standby: {e}"),
            }
            if let Some(answer) = request.answer {
                let _ = answer.send(outcome);
            }
        }
    }

    async fn give_standby(&self, request: &StandbyRequest) -> Result<u32, String> {
        let (Some(standby), Some(standby_inputs)) = (&self.standby, &self.standby_inputs) else {
            return Err("this host runs no standbys (standby_interface)".into());
        };
        let service = self
            .services
            .get(&request.service)
            .ok_or_else(|| format!("no service {}", request.service))?;
        if let Some(pid) = service.standby_pid.filter(|&pid| service.still_runs(pid)) {
            return Err(format!("it has a standby already, process {pid}"));
        }
        let main = Dataplane::open(&self.pin_root).map_err(|e| e.to_string())?;
        let (flow_id, _) = service_flows(&main, &service).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + SUBSCRIBE_LIMIT;
        let mut log = loop {
            match self.inputs.subscribe(&[flow_id], SUBSCRIPTION_CAPACITY) {
                Ok(log) => break log,
                Err(busy) if Instant::now() > deadline => return Err(busy.to_string()),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        if request.after_migration {
            self.wait_for_direct_inputs(&mut log).await?;
        }
        // What the standby is held from here on, for its replay.
        let held = standby_inputs
            .subscribe(&[flow_id], SUBSCRIPTION_CAPACITY)
            .map_err(|e| e.to_string())?;
        let standby = standby.clone();
        let (seeder, images) = (self.clone_parts(), self.images_dir.join(&service.name));
        let seeded = tokio::task::spawn_blocking(move || {
            seeder.seed(&service, &standby, &mut log, held, &images)
        })
        .await
        .map_err(|e| format!("the seeding task: {e}"))?
        .map_err(|e| e.to_string())?;
        let service = self.services.get(&request.service);
        let registered = service.map(|mut service| {
            service.standby_pid = Some(seeded);
            service.registered.extend(Identity::of(seeded));
            self.services.replace(service)
        });
        match registered {
            Some(Ok(())) => Ok(seeded),
            // Gone meanwhile (migrated on, unregistered): no standby to keep.
            _ => {
                tasks::kill_pid_namespace(seeded);
                Err(format!(
                    "service {} changed while its standby was seeded",
                    request.service
                ))
            }
        }
    }

    /// Waits until `log` has brought no input forwarded by a former source
    /// (one arriving on the peer interface) for [`FORWARDED_QUIET`]; an
    /// error if they keep coming for [`FORWARDED_LIMIT`].
    async fn wait_for_direct_inputs(&self, log: &mut Subscription) -> Result<(), String> {
        let peer = self
            .peer_interface
            .as_deref()
            .and_then(|name| crate::host::netdev::Interface::by_name(name).ok())
            .map(|i| i.index);
        let limit = Instant::now() + FORWARDED_LIMIT;
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < FORWARDED_QUIET {
            if Instant::now() > limit {
                return Err(
                    "the former source still forwards inputs (a field device that \
                            missed the announce?): no standby until they come here directly"
                        .into(),
                );
            }
            if let Ok(Some(record)) = tokio::time::timeout(FORWARDED_QUIET, log.next()).await {
                let forwarded =
                    record.header.kind == RECORD_MIRRORED && Some(record.header.ifindex) == peer;
                if forwarded {
                    quiet_since = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// What the blocking part of a seeding needs, owned.
    fn clone_parts(&self) -> SeedParts {
        SeedParts {
            pin_root: self.pin_root.clone(),
            interface: self.interface.clone(),
            criu: self.criu.clone(),
            cpus: self.cpus.clone(),
        }
    }
}

/// The daemon's parts a seeding uses while it blocks.
struct SeedParts {
    pin_root: PathBuf,
    interface: String,
    criu: Criu,
    cpus: Vec<usize>,
}

impl SeedParts {
    /// Seeds a standby of `service` in `standby`'s namespace from a
    /// checkpoint (into `images`) of its serving instance, whose inputs
    /// `log` brings; `held` brings what the standbys' dataplane holds for
    /// it. The standby's pid; undone on failure.
    fn seed(
        &self,
        service: &Service,
        standby: &StandbyHost,
        log: &mut Subscription,
        mut held: Subscription,
        images: &Path,
    ) -> Result<u32, Cause> {
        if !service.still_runs(service.pid) {
            return Err(Cause::NotRegistered(service.pid));
        }
        let mut main = Dataplane::open(&self.pin_root)?;
        let (flow_id, members) = service_flows(&main, service)?;
        let keys: Vec<FlowKey> = members.iter().map(|(k, _)| *k).collect();
        standby.make_room(&service.flows).map_err(Cause::Standby)?;
        let mut standbys = Dataplane::open(&standby.pin_root)?;
        for key in &keys {
            let _ = standbys.remove_flow(key);
        }
        let gate = Gate {
            mode: GATE_HOLD_ALL,
            output: OUTPUT_MUTE,
            // Fed in order from its first input: its outputs are counted.
            tagging: TAG_COUNTED,
            ..Default::default()
        };
        let mut restored = None;
        let outcome = (|| {
            standbys.adopt_flows(&keys, flow_id)?;
            standbys.set_gate(flow_id, gate)?;
            for (key, config) in &members {
                main.set_flow_flags(key, config.flags | FLOW_STANDBY)?;
            }
            let taken = self.checkpoint(service, flow_id, log, images)?;
            tracing::info!(service = %service.name, held_us = taken.held_us,
                frozen_us = taken.frozen_us, "checkpointed the serving instance for its standby");
            let pid = self.restore(standby, images)?;
            restored = Some(pid);
            let mut instance = Checkpointed {
                pid,
                dataplane: Dataplane::open(&standby.pin_root)?,
                netns: Some(standby.netns.clone()),
                interface: STANDBY_END.into(),
                container: None,
            };
            instance
                .resume(taken.position, &mut held)
                .map_err(|error| Cause::Resume { error, lost: None })?;
            Ok(pid)
        })();
        let _ = std::fs::remove_dir_all(images);
        if outcome.is_err() {
            if let Some(pid) = restored {
                tasks::kill_pid_namespace(pid);
            }
            for (key, config) in &members {
                let _ = main.set_flow_flags(key, config.flags & !FLOW_STANDBY);
            }
            for key in &keys {
                let _ = standbys.remove_flow(key);
            }
        }
        outcome
    }

    /// Checkpoints the serving instance of `service` (left running) into
    /// `images`: a leave-running migration's hold of its inputs.
    fn checkpoint(
        &self,
        service: &Service,
        flow_id: u32,
        log: &mut Subscription,
        images: &Path,
    ) -> Result<Taken, Cause> {
        let mut serving = Checkpointed {
            pid: service.pid,
            dataplane: Dataplane::open(&self.pin_root)?,
            netns: None,
            interface: self.interface.clone(),
            container: None,
        };
        let dump = serving.dump_request(images)?;
        let never = AtomicBool::new(false);
        let taken =
            serving.checkpoint(flow_id, log, &self.criu, &dump, Budget::default(), &never)?;
        Ok(taken)
    }

    /// Restores `images` into the standbys' namespace, on the standbys'
    /// CPUs: the restored root's pid. CRIU restores it in the namespace it
    /// runs in: the serving instance, whose image this is, shares this
    /// daemon's, which is then no namespace of its own to CRIU.
    fn restore(&self, standby: &StandbyHost, images: &Path) -> Result<u32, Cause> {
        let netns = open_netns(&standby.netns).map_err(Cause::HostNetns)?;
        let request = RestoreRequest {
            images_dir: images.to_owned(),
            inherit: vec![("extnet".into(), &netns)],
        };
        let pid = standby
            .inside(|| self.criu.restore(&request, &mut |_, _| true))
            .map_err(Cause::Standby)?
            .map_err(Cause::Restore)?;
        if let Err(e) = tasks::pin(pid, &self.cpus) {
            tracing::warn!(pid, "standby left on CRIU's CPUs: {e}");
        }
        Ok(pid)
    }
}

/// The id `service`'s flows have in `dataplane`, and each flow with its
/// configuration.
fn service_flows(
    dataplane: &Dataplane,
    service: &Service,
) -> Result<(u32, Vec<(FlowKey, FlowConfig)>), Cause> {
    let keys: Vec<FlowKey> = service
        .flows
        .iter()
        .map(|f| flow::udp(f.cps, f.service))
        .collect();
    let members: Vec<(FlowKey, FlowConfig)> = dataplane
        .flows()?
        .into_iter()
        .filter(|(k, _)| keys.contains(k))
        .collect();
    match members.first() {
        Some(&(_, FlowConfig { flow_id, .. })) if members.len() == keys.len() => {
            Ok((flow_id, members))
        }
        _ => Err(Cause::FlowNotLoaded(
            keys.first().map(flow::display).unwrap_or_default(),
        )),
    }
}
