//! The destination's side of a migration, one step per `MIGRATE` frame from
//! the source daemon, each answered by a `MIGRATED` frame.
//!
//! The destination's state lives as long as the peer link: if the link
//! breaks before `Finish` (the source daemon died, the network did), the
//! destination rolls back on its own: the restored instance is killed, the
//! flows it adopted are removed, and the images are deleted. Unless the
//! source had already handed the service over (an output gate opened at
//! the first input forwarded past K): then this host keeps serving and
//! announces the service address itself.
//!
//! A journal says what to undo or keep should this daemon die
//! mid-migration; [`recover`] acts on it at the next start.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use dataplane_common::{
    GATE_HOLD_ALL, GATE_SEQUENCED, OUTPUT_ARMED, OUTPUT_FROM, OUTPUT_MUTE, RECORD_OUTPUT,
};
use serde::Serialize;

use crate::{
    criu::{RestoreRequest, open_netns, stats},
    host::tasks::Identity,
    kernel::{
        flow,
        injector::Injector,
        loader::Dataplane,
        logs::{LogGuard, Records, Subscription},
    },
    migration::{
        error::{Cause, InstanceEnd},
        hold,
        hold::FlowPosition,
        journal::{Files, Journal, Side},
        protocol::{Finished, Output, Restored, SUBSCRIPTION_CAPACITY, Step, TargetFlow},
    },
    peer::{Link, MAX_FRAME, PeerError, frame, transfer},
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
    /// Restores migrated services.
    pub criu: crate::criu::Criu,
    /// The daemon's readers of the input and output logs.
    pub inputs: Option<Arc<crate::kernel::logs::Tap>>,
    pub outputs: Option<Arc<crate::kernel::logs::Tap>>,
    /// Turns true when the daemon stops: a link then ends before its next
    /// step, and the migration on it rolls back (or, handed over, keeps
    /// serving) as when the link drops.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// Serves one admitted peer link: pings, checkpoint images, and the steps
/// of a migration to this host, which lives as long as the link.
pub async fn serve_link(
    mut link: Link,
    from: SocketAddr,
    host: Arc<Host>,
) -> Result<(), PeerError> {
    let host = host.as_ref();
    let mut target: Option<Target> = None;
    let mut stopping = host.stopping.clone();
    loop {
        let received = tokio::select! {
            biased;
            // Between two steps: dropping `target` undoes it.
            Ok(_) = stopping.wait_for(|stop| *stop) => {
                tracing::info!(%from, "the daemon stops: peer link closed");
                return Ok(());
            }
            received = link.recv(MAX_FRAME) => received,
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
                let received =
                    transfer::receive(&mut link, &payload, host.files.incoming_root()).await;
                if let Ok(r) = &received {
                    tracing::info!(%from, migration = %r.migration, files = r.files,
                        bytes = r.bytes, "received checkpoint images");
                }
                answer(&mut link, from, received, frame::IMAGES_OK).await?;
            }
            frame::MIGRATE => {
                let outcome = match serde_json::from_slice::<Step>(&payload) {
                    Err(e) => Err(Cause::NotAStep(e)),
                    Ok(Step::Prepare { migration, flows }) if target.is_none() => {
                        tracing::info!(%from, %migration, "preparing a migration to this host");
                        Target::prepare(host, migration, flows).map(|t| {
                            target = Some(t);
                            serde_json::json!({})
                        })
                    }
                    Ok(step) => match target.as_mut() {
                        Some(t) => t.step(step).await,
                        None => Err(Cause::NotPrepared),
                    },
                };
                if target.as_ref().is_some_and(|t| t.ended()) {
                    target = None;
                }
                let answer = match outcome {
                    Ok(ok) => serde_json::json!({ "ok": ok }),
                    Err(error) => {
                        tracing::warn!(%from, "migration step failed: {error}");
                        serde_json::json!({ "error": error.to_string() })
                    }
                };
                let answer = serde_json::to_vec(&answer).expect("serializes");
                link.send(frame::MIGRATED, &answer).await?;
            }
            other => {
                let reason = format!("unexpected frame type {other}");
                let _ = link.send(frame::REFUSE, reason.as_bytes()).await;
                return Err(PeerError::Garbage(reason));
            }
        }
    }
}

/// Answers a request that moved data: its receipt in an `ok_kind` frame,
/// or a `REFUSE` with the reason, after which the link closes (the error
/// is returned).
async fn answer<T: Serialize>(
    link: &mut Link,
    from: SocketAddr,
    outcome: Result<T, PeerError>,
    ok_kind: u8,
) -> Result<(), PeerError> {
    match outcome {
        Ok(receipt) => {
            let ok = serde_json::to_vec(&receipt).expect("serializes");
            link.send(ok_kind, &ok).await
        }
        Err(e) => {
            tracing::warn!(%from, "refused: {e}");
            // Best effort: the link may be gone already.
            let _ = link.send(frame::REFUSE, e.to_string().as_bytes()).await;
            Err(e)
        }
    }
}

/// A migration in progress on the destination.
pub struct Target<'a> {
    host: &'a Host,
    dataplane: Dataplane,
    migration: String,
    flows: Vec<TargetFlow>,
    inputs: Subscription,
    outputs: Subscription,
    /// Whether the input log failed a mirrored input: the replay needs them all.
    log: LogGuard,
    instance: Option<u32>,
    finished: bool,
    /// CPU time used when `Prepare` came.
    cpu: crate::host::tasks::CpuTime,
}

impl<'a> Target<'a> {
    /// Handles `Prepare`.
    pub fn prepare(
        host: &'a Host,
        migration: String,
        flows: Vec<TargetFlow>,
    ) -> Result<Self, Cause> {
        transfer::plain_name(&migration).map_err(Cause::Name)?;
        if flows.len() != 1 {
            return Err(Cause::FlowCount(flows.len()));
        }
        let (Some(inputs), Some(outputs)) = (&host.inputs, &host.outputs) else {
            return Err(Cause::NoLogs);
        };
        announces_only_its_own(&host.interface)?;
        let mut dataplane = Dataplane::open(&host.pin_root)?;
        let inputs = inputs.subscribe(SUBSCRIPTION_CAPACITY)?;
        let outputs = outputs.subscribe(SUBSCRIPTION_CAPACITY)?;
        let log = LogGuard::new(&dataplane)?;
        for f in &flows {
            let key = flow::udp(f.spec.cps, f.spec.service);
            dataplane.adopt_flow(key, f.flow_id, 0)?;
            let gate = dataplane_common::Gate {
                mode: GATE_HOLD_ALL,
                output: OUTPUT_MUTE,
                // A replica fed in order from its first input: its
                // outputs are counted (a burst at the cutover must not
                // tag the answer to K as K+1's).
                tagging: dataplane_common::TAG_COUNTED,
                ..Default::default()
            };
            dataplane.set_gate(f.flow_id, gate)?;
        }
        let target = Self {
            host,
            dataplane,
            migration,
            flows,
            inputs,
            outputs,
            log,
            instance: None,
            finished: false,
            cpu: crate::host::tasks::CpuTime::now(),
        };
        target.write_journal()?;
        Ok(target)
    }

    /// Handles every step after `Prepare`; the reply's JSON value.
    pub async fn step(&mut self, step: Step) -> Result<serde_json::Value, Cause> {
        let json = |v| serde_json::to_value(v).expect("serializes");
        match step {
            Step::Prepare { .. } => Err(Cause::AlreadyPrepared),
            Step::Restore { positions, cpus } => self.restore(positions, cpus).await.map(json),
            Step::Outputs {
                after,
                count,
                timeout_ms,
            } => {
                let outputs = self
                    .next_outputs(after, count, Duration::from_millis(timeout_ms))
                    .await;
                self.check_instance("convergence")?;
                Ok(serde_json::to_value(outputs).expect("serializes"))
            }
            Step::Arm { flows } => {
                self.check_instance("the cutover")?;
                self.arm(&flows).map(|()| serde_json::json!({}))
            }
            Step::Announce => self.announce().map(|a| serde_json::json!({"announced": a})),
            Step::Finish => {
                self.end();
                let (daemon_cpu_us, criu_cpu_us) = crate::host::tasks::CpuTime::since(self.cpu);
                let finished = Finished {
                    pid: self.instance,
                    daemon_cpu_us,
                    criu_cpu_us,
                };
                Ok(serde_json::to_value(finished).expect("serializes"))
            }
            Step::Abort => {
                self.rollback();
                Ok(serde_json::json!({}))
            }
        }
    }

    fn images(&self) -> std::path::PathBuf {
        self.host.files.images(Side::Destination, &self.migration)
    }

    async fn restore(
        &mut self,
        positions: Vec<FlowPosition>,
        cpus: Vec<usize>,
    ) -> Result<Restored, Cause> {
        if self.instance.is_some() {
            return Err(Cause::AlreadyRestored);
        }
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
        let criu = self.host.criu.clone();
        let (files, migration, flows) = (
            self.host.files.clone(),
            self.migration.clone(),
            self.flows.clone(),
        );
        let start = Instant::now();
        let restored = tokio::task::spawn_blocking(move || {
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
                    let journal = Journal::Destination {
                        flows: flows.clone(),
                        instance: Identity::of(pid),
                    };
                    journaled = files
                        .write(&migration, &journal)
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
        .map_err(Cause::RestoreTask)??;
        let (pid, restore_us, criu_us) = restored;
        self.instance = Some(pid);
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
        let interface = self
            .host
            .peer_interface
            .as_deref()
            .ok_or(Cause::NoPeerInterface)?;
        let mut injector = Injector::open(&self.host.pin_root, interface)?;
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
        let replay_end = self.dataplane.gate(position.flow_id)?.next_expected - 1;
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
            if record.header.kind == RECORD_OUTPUT && record.header.seq > after {
                outputs.push(Output {
                    flow_id: record.header.flow_id,
                    seq: record.header.seq,
                    payload: crate::migration::converge::udp_payload(&record.frame).to_vec(),
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
        let window = self.dataplane.gate_window()?;
        for &flow_id in flows {
            if !self.flows.iter().any(|f| f.flow_id == flow_id) {
                return Err(Cause::ForeignFlow(flow_id));
            }
            if self.dataplane.gate(flow_id)?.mode != GATE_SEQUENCED {
                return Err(Cause::NotReplayed);
            }
            window.arm_outputs(flow_id);
        }
        Ok(())
    }

    fn announce(&self) -> Result<Vec<IpAddr>, Cause> {
        announce(&self.host.interface, &self.flows)
    }

    /// Records the flows and the instance, for [`recover`].
    fn write_journal(&self) -> Result<(), Cause> {
        let journal = Journal::Destination {
            flows: self.flows.clone(),
            instance: self.instance.and_then(Identity::of),
        };
        Ok(self.host.files.write(&self.migration, &journal)?)
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
        if let Some(pid) = self.instance.take() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            // The restored root is this daemon's child: reap it.
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        forget_flows(&mut self.dataplane, &self.flows);
        self.end();
    }

    /// Whether the migration ended (finished or rolled back).
    pub fn ended(&self) -> bool {
        self.finished
    }
}

impl Drop for Target<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if handed_over(&self.dataplane, &self.flows) {
            tracing::warn!(migration = %self.migration,
                "peer link lost after the handover: this host keeps serving");
            if let Err(e) = self.announce() {
                tracing::warn!(migration = %self.migration, "announcing: {e}");
            }
            self.end();
        } else {
            tracing::warn!(migration = %self.migration, "peer link lost mid-migration: rolling back");
            self.rollback();
        }
    }
}

/// How long an armed destination that lost the source waits for the
/// handover: the source's kernel may have been flipped and cut over at its
/// next input (well within this at any control rate) even with its daemon
/// gone.
const ARMED_GRACE: Duration = Duration::from_secs(2);

/// Whether the source has handed the service over: an output gate was
/// opened by the first input forwarded past K. While a gate is armed and
/// not yet opened, waits up to `ARMED_GRACE` for that input.
fn handed_over(dataplane: &Dataplane, flows: &[TargetFlow]) -> bool {
    let outputs = || {
        flows
            .iter()
            .filter_map(|f| dataplane.gate(f.flow_id).ok().map(|g| g.output))
            .collect::<Vec<_>>()
    };
    wait_for_handover(outputs, ARMED_GRACE)
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

/// Removes the flows a migration adopted, and their gates.
fn forget_flows(dataplane: &mut Dataplane, flows: &[TargetFlow]) {
    for f in flows {
        let _ = dataplane.remove_flow(&flow::udp(f.spec.cps, f.spec.service));
        let _ = dataplane.set_gate(f.flow_id, Default::default());
    }
}

/// Makes this host the service addresses' owner on `interface` and tells
/// the neighbours (a gratuitous ARP, or an unsolicited neighbour
/// advertisement for IPv6). An address it has already is fine.
fn announce(interface: &str, flows: &[TargetFlow]) -> Result<Vec<IpAddr>, Cause> {
    let mut announced = Vec::new();
    for f in flows {
        let address = f.spec.service.ip();
        let owned = match crate::host::netdev::own_address(interface, address) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            owned => owned,
        };
        owned
            .and_then(|()| match address {
                IpAddr::V4(v4) => crate::host::netdev::gratuitous_arp(interface, v4),
                IpAddr::V6(v6) => crate::host::netdev::unsolicited_na(interface, v6),
            })
            .map_err(|source| Cause::Announce { address, source })?;
        announced.push(address);
    }
    Ok(announced)
}

/// Finishes what a migration to this host left when the daemon died, from
/// its journal (see [`super::recovery`]). Handed over: the instance keeps
/// serving, the address is announced. Not: the instance is killed (if it
/// is still the process the journal names), the flows go.
pub(super) fn recover(
    pin_root: &Path,
    interface: &str,
    flows: &[TargetFlow],
    instance: Option<Identity>,
) -> String {
    let mut dataplane = match Dataplane::open(pin_root) {
        Ok(d) => d,
        Err(e) => return format!("no dataplane to clean up ({e})"),
    };
    if handed_over(&dataplane, flows) {
        return match announce(interface, flows) {
            Ok(addresses) => format!("handed over; kept serving, announced {addresses:?}"),
            Err(e) => format!("handed over; kept serving; {e}"),
        };
    }
    let killed = instance.filter(Identity::runs);
    if let Some(i) = killed {
        let pid = nix::unistd::Pid::from_raw(i.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    forget_flows(&mut dataplane, flows);
    match killed {
        Some(i) => format!("rolled back: killed instance {}, removed its flows", i.pid),
        None => "rolled back: removed its flows".into(),
    }
}

/// Refuses a destination whose kernel would name the service address in
/// its own ARP requests: the restored instance's first (muted) output
/// would then announce the address and pull the CPS's traffic over before
/// the cutover.
fn announces_only_its_own(interface: &str) -> Result<(), Cause> {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/arp_announce"))
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    // The kernel uses the larger of "all" and the interface's value.
    if read("all").max(read(interface)) >= 2 {
        Ok(())
    } else {
        Err(Cause::ArpAnnounce(interface.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

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
