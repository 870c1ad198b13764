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
//! A journal beside the images says what to undo or keep should this
//! daemon die mid-migration; [`recover`] acts on it at the next start.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use dataplane_common::{
    GATE_HOLD_ALL, GATE_SEQUENCED, OUTPUT_ARMED, OUTPUT_FROM, OUTPUT_MUTE, RECORD_OUTPUT,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::{
    criu::{RestoreRequest, open_netns, stats},
    kernel::{
        flow,
        injector::Injector,
        loader::Dataplane,
        logs::{LogGuard, Records, Subscription},
    },
    migration::{
        hold,
        hold::FlowPosition,
        protocol::{Finished, Output, Restored, SUBSCRIPTION_CAPACITY, Step, TargetFlow},
    },
    peer::{MAX_FRAME, PeerError, frame, read_frame, transfer, write_frame},
};

/// What the destination works with on this host.
#[derive(Clone)]
pub struct Host {
    /// Where received checkpoint images go.
    pub images_root: PathBuf,
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
}

/// Serves one admitted peer link: pings, checkpoint images, and the steps
/// of a migration to this host, which lives as long as the link.
pub async fn serve_link(
    mut stream: TcpStream,
    from: SocketAddr,
    host: Arc<Host>,
) -> Result<(), PeerError> {
    let host = host.as_ref();
    let mut target: Option<Target> = None;
    loop {
        let (kind, payload) = match read_frame(&mut stream, MAX_FRAME).await {
            Ok(frame) => frame,
            Err(PeerError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::info!(%from, "peer link closed by the peer");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match kind {
            frame::PING => write_frame(&mut stream, frame::PONG, &[]).await?,
            frame::IMAGES => {
                let received = transfer::receive(&mut stream, &payload, &host.images_root).await;
                if let Ok(r) = &received {
                    tracing::info!(%from, migration = %r.migration, files = r.files,
                        bytes = r.bytes, "received checkpoint images");
                }
                answer(&mut stream, from, received, frame::IMAGES_OK).await?;
            }
            frame::MIGRATE => {
                let outcome = match serde_json::from_slice::<Step>(&payload) {
                    Err(e) => Err(format!("not a migration step: {e}")),
                    Ok(Step::Prepare { migration, flows }) if target.is_none() => {
                        tracing::info!(%from, %migration, "preparing a migration to this host");
                        Target::prepare(host, migration, flows).map(|t| {
                            target = Some(t);
                            serde_json::json!({})
                        })
                    }
                    Ok(step) => match target.as_mut() {
                        Some(t) => t.step(step).await,
                        None => Err("no migration is prepared on this link".into()),
                    },
                };
                if target.as_ref().is_some_and(|t| t.ended()) {
                    target = None;
                }
                let answer = match outcome {
                    Ok(ok) => serde_json::json!({ "ok": ok }),
                    Err(error) => {
                        tracing::warn!(%from, "migration step failed: {error}");
                        serde_json::json!({ "error": error })
                    }
                };
                let answer = serde_json::to_vec(&answer).expect("serializes");
                write_frame(&mut stream, frame::MIGRATED, &answer).await?;
            }
            other => {
                let reason = format!("unexpected frame type {other}");
                let _ = write_frame(&mut stream, frame::REFUSE, reason.as_bytes()).await;
                return Err(PeerError::Garbage(reason));
            }
        }
    }
}

/// Answers a request that moved data: its receipt in an `ok_kind` frame,
/// or a `REFUSE` with the reason, after which the link closes (the error
/// is returned).
async fn answer<T: Serialize>(
    stream: &mut TcpStream,
    from: SocketAddr,
    outcome: Result<T, PeerError>,
    ok_kind: u8,
) -> Result<(), PeerError> {
    match outcome {
        Ok(receipt) => {
            let ok = serde_json::to_vec(&receipt).expect("serializes");
            write_frame(stream, ok_kind, &ok).await
        }
        Err(e) => {
            tracing::warn!(%from, "refused: {e}");
            // Best effort: the link may be gone already.
            let _ = write_frame(stream, frame::REFUSE, e.to_string().as_bytes()).await;
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
    ) -> Result<Self, String> {
        transfer::plain_name(&migration).map_err(|e| e.to_string())?;
        if flows.len() != 1 {
            return Err(format!(
                "a migrated service has exactly one flow here ({} given)",
                flows.len()
            ));
        }
        let (Some(inputs), Some(outputs)) = (&host.inputs, &host.outputs) else {
            return Err("this daemon does not read its logs".into());
        };
        announces_only_its_own(&host.interface)?;
        let mut dataplane = Dataplane::open(&host.pin_root).map_err(|e| e.to_string())?;
        let inputs = inputs
            .subscribe(SUBSCRIPTION_CAPACITY)
            .map_err(|e| e.to_string())?;
        let outputs = outputs
            .subscribe(SUBSCRIPTION_CAPACITY)
            .map_err(|e| e.to_string())?;
        let log = LogGuard::new(&dataplane)?;
        for f in &flows {
            let key = flow::udp(f.spec.cps, f.spec.service);
            dataplane
                .adopt_flow(key, f.flow_id, 0)
                .map_err(|e| e.to_string())?;
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
                .set_gate(f.flow_id, gate)
                .map_err(|e| e.to_string())?;
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
    pub async fn step(&mut self, step: Step) -> Result<serde_json::Value, String> {
        let json = |v| serde_json::to_value(v).expect("serializes");
        match step {
            Step::Prepare { .. } => Err("a migration is already prepared on this link".into()),
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
        self.host.images_root.join(&self.migration)
    }

    async fn restore(
        &mut self,
        positions: Vec<FlowPosition>,
        cpus: Vec<usize>,
    ) -> Result<Restored, String> {
        if self.instance.is_some() {
            return Err("already restored".into());
        }
        let [position] = positions[..] else {
            return Err("one flow position expected".into());
        };
        if !self.flows.iter().any(|f| f.flow_id == position.flow_id) {
            return Err(format!(
                "flow {} is not part of this migration",
                position.flow_id
            ));
        }
        let images = self.images();
        if !images.is_dir() {
            return Err(format!("no images at {}", images.display()));
        }
        let criu = self.host.criu.clone();
        let (images_root, migration, flows) = (
            self.host.images_root.clone(),
            self.migration.clone(),
            self.flows.clone(),
        );
        let start = Instant::now();
        let restored = tokio::task::spawn_blocking(move || {
            let netns = open_netns(Path::new("/proc/self/ns/net"))
                .map_err(|e| format!("opening this host's network namespace: {e}"))?;
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
                    journaled = write_journal(&images_root, &migration, &flows, Some(pid))
                        .inspect_err(|e| tracing::warn!("{e}"))
                        .is_ok();
                    journaled
                }
                _ => true,
            };
            let start = Instant::now();
            let pid = criu
                .restore(&request, &mut journal)
                .map_err(|e| format!("restore: {e}"))?;
            let criu_us = start.elapsed().as_micros() as u64;
            let restore_us = stats::restore(&images).map_or(0, |s| s.restore_time.into());
            Ok::<_, String>((pid, restore_us, criu_us))
        })
        .await
        .map_err(|e| format!("restore task: {e}"))??;
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
            .ok_or("this daemon has no peer interface to replay on")?;
        let mut injector =
            Injector::open(&self.host.pin_root, interface).map_err(|e| e.to_string())?;
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
        let replayed = replayed.map_err(|e| format!("replay: {e}"))?;
        let replay_end = self
            .dataplane
            .gate(position.flow_id)
            .map_err(|e| e.to_string())?
            .next_expected
            - 1;
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
    fn arm(&mut self, flows: &[u32]) -> Result<(), String> {
        // The last moment to back out if this log lost an input.
        self.log.check(&self.dataplane, &self.inputs)?;
        let window = self.dataplane.gate_window().map_err(|e| e.to_string())?;
        for &flow_id in flows {
            if !self.flows.iter().any(|f| f.flow_id == flow_id) {
                return Err(format!("flow {flow_id} is not part of this migration"));
            }
            let gate = self.dataplane.gate(flow_id).map_err(|e| e.to_string())?;
            if gate.mode != GATE_SEQUENCED {
                return Err("the instance is not restored and replayed yet".into());
            }
            window.arm_outputs(flow_id);
        }
        Ok(())
    }

    fn announce(&self) -> Result<Vec<String>, String> {
        announce(&self.host.interface, &self.flows)
    }

    fn journal_path(&self) -> std::path::PathBuf {
        journal_path(&self.host.images_root, &self.migration)
    }

    /// Records the flows and the instance, for [`recover`].
    fn write_journal(&self) -> Result<(), String> {
        write_journal(
            &self.host.images_root,
            &self.migration,
            &self.flows,
            self.instance,
        )
    }

    /// The migration is over here, either way: the images and the journal go.
    fn end(&mut self) {
        let _ = std::fs::remove_dir_all(self.images());
        let _ = std::fs::remove_file(self.journal_path());
        self.finished = true;
    }

    /// An error if the restored instance (this daemon's child) has exited;
    /// it is reaped then.
    fn check_instance(&mut self, during: &str) -> Result<(), String> {
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
            Ok(WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
            Ok(WaitStatus::Signaled(_, signal, _)) => format!("was killed by {signal}"),
            Ok(other) => return Err(format!("instance {pid} changed state: {other:?}")),
            Err(e) => format!("is gone ({e})"),
        };
        self.instance = None;
        Err(format!("the restored instance {pid} {how} during {during}"))
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

/// What a destination daemon that dies mid-migration leaves to undo or
/// keep.
#[derive(Serialize, Deserialize)]
struct Journal {
    flows: Vec<TargetFlow>,
    instance: Option<Instance>,
}

/// A restored instance, known by its pid and start time (pids are reused).
#[derive(Clone, Copy, Serialize, Deserialize)]
struct Instance {
    pid: u32,
    start_time: u64,
}

fn journal_path(images_root: &Path, migration: &str) -> std::path::PathBuf {
    images_root.join(format!("{migration}.journal.json"))
}

/// Writes the journal of `migration`: its flows and restored instance.
fn write_journal(
    images_root: &Path,
    migration: &str,
    flows: &[TargetFlow],
    instance: Option<u32>,
) -> Result<(), String> {
    let journal = Journal {
        flows: flows.to_vec(),
        instance: instance.and_then(|pid| {
            Some(Instance {
                pid,
                start_time: crate::host::tasks::start_time(pid)?,
            })
        }),
    };
    let path = journal_path(images_root, migration);
    let text = serde_json::to_vec(&journal).expect("a journal serializes");
    std::fs::create_dir_all(images_root)
        .and_then(|()| std::fs::write(&path, text))
        .map_err(|e| format!("writing {}: {e}", path.display()))
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
    let start = Instant::now();
    loop {
        let modes = outputs();
        if modes.contains(&OUTPUT_FROM) {
            return true;
        }
        if !modes.contains(&OUTPUT_ARMED) || start.elapsed() > ARMED_GRACE {
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
fn announce(interface: &str, flows: &[TargetFlow]) -> Result<Vec<String>, String> {
    let mut announced = Vec::new();
    for f in flows {
        let addr = f.spec.service.ip();
        match crate::host::netdev::own_address(interface, addr) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(format!("{addr}: {e}"));
            }
            _ => {}
        }
        match addr {
            IpAddr::V4(v4) => crate::host::netdev::gratuitous_arp(interface, v4),
            IpAddr::V6(v6) => crate::host::netdev::unsolicited_na(interface, v6),
        }
        .map_err(|e| format!("{addr}: {e}"))?;
        announced.push(addr.to_string());
    }
    Ok(announced)
}

/// At a daemon's start: finishes what migrations to this host left when
/// its previous run died. Handed over: the instance keeps serving, the
/// address is announced. Not: the instance is killed, the flows go.
/// Either way the images and the journal are removed. What was done, one
/// line per migration.
pub fn recover(host: &Host) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(&host.images_root) else {
        return Vec::new();
    };
    let mut done = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(migration) = name.strip_suffix(".journal.json") else {
            continue;
        };
        let outcome = recover_one(host, &entry.path());
        let _ = std::fs::remove_dir_all(host.images_root.join(migration));
        let _ = std::fs::remove_file(entry.path());
        let line = format!("migration {migration} to this host: {outcome}");
        tracing::warn!("{line}");
        done.push(line);
    }
    done
}

fn recover_one(host: &Host, journal: &Path) -> String {
    let journal: Journal = match std::fs::read(journal)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(journal) => journal,
        Err(e) => return format!("unreadable journal ({e}); removed"),
    };
    let mut dataplane = match Dataplane::open(&host.pin_root) {
        Ok(d) => d,
        Err(e) => return format!("no dataplane to clean up ({e})"),
    };
    if handed_over(&dataplane, &journal.flows) {
        return match announce(&host.interface, &journal.flows) {
            Ok(addresses) => format!("handed over; kept serving, announced {addresses:?}"),
            Err(e) => format!("handed over; kept serving; announcing failed: {e}"),
        };
    }
    let killed = journal
        .instance
        .filter(|i| crate::host::tasks::start_time(i.pid) == Some(i.start_time));
    if let Some(i) = killed {
        let pid = nix::unistd::Pid::from_raw(i.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    forget_flows(&mut dataplane, &journal.flows);
    match killed {
        Some(i) => format!("rolled back: killed instance {}, removed its flows", i.pid),
        None => "rolled back: removed its flows".into(),
    }
}

/// Refuses a destination whose kernel would name the service address in
/// its own ARP requests: the restored instance's first (muted) output
/// would then announce the address and pull the CPS's traffic over before
/// the cutover.
fn announces_only_its_own(interface: &str) -> Result<(), String> {
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
        Err(format!(
            "set net.ipv4.conf.{interface}.arp_announce=2 on the destination: otherwise the \
             restored instance's first output announces the service address and takes the \
             CPS's traffic before the cutover"
        ))
    }
}
