//! The command line: its arguments, and one module per group of commands.
mod daemon;
mod flows;
mod local;
mod migrate;
mod plan;
mod status;

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use dataplane_user::{
    config::{DEFAULT_IDENTITY, DEFAULT_SOCKET},
    control::{
        client::{Client, ClientError},
        method::Call,
    },
    host::netdev::parse_mac,
    kernel::loader::DEFAULT_PIN_ROOT,
    migration::hold::Budget,
    report::Mode,
};
use serde::{Serialize, de::DeserializeOwned};

#[derive(Parser)]
#[command(
    version,
    about = "Packet duplication and replay dataplane for live migration"
)]
pub struct Cli {
    /// bpffs directory the dataplane is pinned under (load, unload, gate, capture).
    #[arg(long, global = true, default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print the daemon's JSON answers instead of tables, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: adopt or load the dataplane, serve the control socket and the peer link.
    Daemon(daemon::Args),
    /// Load and attach the kernel programs, pinned so they outlive this command.
    Load(local::Load),
    /// Detach the programs and remove every pin.
    Unload,
    /// The daemon's view: interfaces, programs, flows, counters, services, migrations.
    Status,
    /// Counters and registry sizes in the OpenMetrics text format.
    Metrics,
    /// Manage CPS flows.
    Flow {
        #[command(subcommand)]
        command: FlowCommand,
    },
    /// Manage the services that migrations move.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Migrate a registered service to the host whose daemon listens at
    /// --to, showing each phase as it runs and a table at the end. Exit
    /// status 5 if the migration failed (the source keeps serving).
    Migrate {
        service: String,
        /// The destination daemon's peer-link address, HOST:PORT: a listed
        /// peer's (`[[peers]]`).
        #[arg(long)]
        to: SocketAddr,
        /// `standby` (checkpoint the standby instance: the serving one never
        /// stops) or `leave-running` (checkpoint the serving one).
        #[arg(long, value_enum, default_value_t = Mode::LeaveRunning)]
        mode: Mode,
        /// Consecutive matching outputs needed for the handover.
        #[arg(long, default_value_t = 10)]
        converge: u32,
        /// Time allowed for convergence, and for K after the flip, in ms
        /// (1 to 600000); the destination waits at least as long.
        #[arg(long, default_value_t = 10_000)]
        deadline_ms: u64,
        /// Take at most this many CRIU pre-dump rounds (kaur2020) before
        /// the checkpoint, while the instance serves unheld (a kernel
        /// without memory tracking gets a single dump).
        #[arg(long, default_value_t = 0)]
        pre_dump_rounds: usize,
        /// The most the checkpoint may hold the instance's inputs, in ms
        /// (its drain and dump included); past it, or past --hold-inputs
        /// or --hold-bytes, the migration fails and every held input is
        /// given back.
        #[arg(long, default_value_t = Budget::default().ms)]
        hold_ms: u64,
        /// The most inputs the checkpoint may hold.
        #[arg(long, default_value_t = Budget::default().inputs)]
        hold_inputs: u64,
        /// The most bytes of inputs the checkpoint may hold.
        #[arg(long, default_value_t = Budget::default().bytes)]
        hold_bytes: u64,
        /// A handover to the service's hot replica only: this host keeps
        /// its instance as the new serving host's hot replica (fed from
        /// the input after K, no checkpoint).
        #[arg(long)]
        keep_replica: bool,
        /// Print the migration's id and return at once.
        #[arg(long)]
        detach: bool,
        /// The calibration to print predictions from (default: the
        /// configuration's `calibration`); none there, no predictions.
        #[arg(long)]
        calibration: Option<PathBuf>,
    },
    /// Give a registered service a hot replica on the host whose daemon
    /// listens at --to: restored from one checkpoint (of its standby if it
    /// has one, else of the serving instance left running), fed every
    /// input by the mirror, its outputs muted and compared with the
    /// service's for as long as it lives. Returns once it is in sync; a
    /// later `migrate --to` the same host hands over to it. Exit status 5
    /// if it could not be made (the service keeps serving).
    Replicate {
        service: String,
        /// The replica host's peer-link address, HOST:PORT.
        #[arg(long, required_unless_present = "stop")]
        to: Option<SocketAddr>,
        /// Consecutive matching outputs that make it in sync.
        #[arg(long, default_value_t = 10)]
        converge: u32,
        /// Time allowed for its first convergence, ms.
        #[arg(long, default_value_t = 10_000)]
        deadline_ms: u64,
        /// End the service's replica instead: its host removes it.
        #[arg(long, conflicts_with = "to")]
        stop: bool,
        /// Print the replica's id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Measure this host's CRIU costs on a synthetic service (dump, copy
    /// and restore per size), fit the migration model (calagna2023's PAM)
    /// and save it; with --from-reports, fit our live modes' costs to real
    /// migrations' reports on top of the saved CRIU terms.
    Calibrate(plan::CalibrateArgs),
    /// Predict a registered service's migration time T_M and downtime T_D
    /// by method, from its size, its dirty rate and this host's calibration.
    Plan {
        service: String,
        /// The live mode to show phase by phase.
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// R, bytes the service dirties per second. Not measured: this
        /// kernel has no soft-dirty tracking. Only pre-copy depends on it.
        #[arg(long, default_value_t = 0.0)]
        dirty_rate: f64,
        /// The calibration (default: the configuration's `calibration`).
        #[arg(long)]
        calibration: Option<PathBuf>,
    },
    /// Stream migration phase changes as they happen.
    Watch,
    /// Abort a migration; the source keeps serving.
    Abort { id: String },
    /// Print this host's public key for the peers' `[[peers]]` lists,
    /// making its identity key first (mode 0600) if there is none.
    Keygen {
        /// The identity key file: the daemon's `identity`.
        #[arg(long, default_value = DEFAULT_IDENTITY)]
        identity: PathBuf,
    },
    /// Check the peer link to a listed peer: handshake and round trip.
    Ping {
        /// The other daemon's peer-link address, HOST:PORT.
        address: SocketAddr,
    },
    /// Set the gate of a flow's mirrored inputs on this host (on the pins).
    Gate {
        /// Flow id, as `flow ls` shows it.
        flow_id: u32,
        #[arg(value_enum)]
        mode: local::GateMode,
        /// `sequenced`: the input sequence number the instance takes next.
        #[arg(long, default_value_t = 1)]
        next_expected: u64,
    },
    /// Print log records as they arrive (from the pins).
    Capture {
        /// Read the output log instead of the input log.
        #[arg(long)]
        outputs: bool,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds without a record.
        #[arg(long, default_value_t = 5)]
        idle_secs: u64,
    },
}

#[derive(Subcommand)]
pub enum FlowCommand {
    /// Start numbering and logging a UDP flow.
    Add {
        /// The CPS end, ADDR:PORT.
        #[arg(long)]
        cps: SocketAddr,
        /// The service end, ADDR:PORT.
        #[arg(long)]
        service: SocketAddr,
    },
    /// Stop logging a flow.
    Rm {
        #[arg(long)]
        cps: SocketAddr,
        #[arg(long)]
        service: SocketAddr,
    },
    /// List flows.
    Ls,
}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Register a service: its process (or container), network namespace
    /// and flows.
    Add {
        name: String,
        /// The service's process (the root of its PID namespace, if any).
        #[arg(long, required_unless_present = "container")]
        pid: Option<u32>,
        /// The OCI container the service runs as, by its id (or podman
        /// name) in this host's runtime: its init process is the service's.
        #[arg(long, conflicts_with = "pid")]
        container: Option<String>,
        /// The runtime its containers run under (runc: `runc_root`;
        /// podman: `podman_root`).
        #[arg(long, value_enum, default_value_t, requires = "container")]
        runtime: dataplane_user::service::Runtime,
        /// Its network namespace, e.g. /run/netns/src.
        #[arg(long)]
        netns: Option<String>,
        /// A flow that feeds it, CPS_ADDR:PORT=SERVICE_ADDR:PORT; repeatable.
        #[arg(long = "flow", value_parser = flow_spec, required = true)]
        flows: Vec<(SocketAddr, SocketAddr)>,
        /// A standby instance's process, fed by the mirror.
        #[arg(long)]
        standby_pid: Option<u32>,
        /// The standby's container (in the standbys' network namespace).
        #[arg(long, conflicts_with = "standby_pid", requires = "container")]
        standby_container: Option<String>,
    },
    /// Start a service as CRIU needs it (own PID namespace and session, no
    /// inherited descriptors, the configured CPUs and priority), with its
    /// flows, and register it: `service start plc --flow CPS=SERVICE -- CMD ARGS...`.
    Start {
        name: String,
        /// A flow that feeds it, CPS_ADDR:PORT=SERVICE_ADDR:PORT; repeatable.
        #[arg(long = "flow", value_parser = flow_spec, required = true)]
        flows: Vec<(SocketAddr, SocketAddr)>,
        /// Start a standby from the same command too, in this host's
        /// standbys' namespace, fed by the mirror.
        #[arg(long)]
        standby: bool,
        /// Run the command in a runc container of this image (its rootfs
        /// `container_images/IMAGE`, read-only, tmpfs at /tmp), named after
        /// the service (its standby NAME-standby).
        #[arg(long)]
        image: Option<String>,
        /// The program and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Give a running service a standby on this host, seeded from a
    /// checkpoint of the serving instance (which keeps serving).
    Standby { name: String },
    /// Forget a service.
    Rm { name: String },
    /// List services.
    Ls,
}

pub(crate) fn mac(text: &str) -> Result<[u8; 6], String> {
    parse_mac(text).ok_or_else(|| format!("{text:?} is not a MAC address like 02:00:00:00:00:01"))
}

fn flow_spec(text: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (cps, service) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not CPS_ADDR:PORT=SERVICE_ADDR:PORT"))?;
    let parse = |s: &str| s.parse::<SocketAddr>().map_err(|e| format!("{s:?}: {e}"));
    Ok((parse(cps)?, parse(service)?))
}

/// What ended a command, by exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The daemon answered with an error (1).
    #[error("error: {0}")]
    Daemon(ClientError),
    /// The daemon could not be reached (3).
    #[error("error: {0}")]
    Unreachable(ClientError),
    /// Anything else (4).
    #[error("error: {0:#}")]
    Local(anyhow::Error),
    /// A migration failed and was rolled back (5).
    #[error("migration failed, the service keeps running on the source: {0}")]
    Migration(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Daemon(_) => 1,
            Failure::Unreachable(_) => 3,
            Failure::Local(_) => 4,
            Failure::Migration(_) => 5,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Rpc(_) => Failure::Daemon(e),
            e => Failure::Unreachable(e),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Local(e)
    }
}

impl From<dataplane_user::kernel::loader::LoadError> for Failure {
    fn from(e: dataplane_user::kernel::loader::LoadError) -> Self {
        Failure::Local(e.into())
    }
}

/// What every command may use: where the daemon and the pins are, and
/// whether to print JSON.
pub struct Context {
    pub pin_root: PathBuf,
    pub socket: PathBuf,
    pub json: bool,
}

impl Context {
    /// Makes `call` on a connection of its own; its answer, as `A`.
    pub fn call<A: DeserializeOwned>(&self, call: Call) -> Result<A, Failure> {
        Ok(self.client()?.request(&call)?)
    }

    pub fn client(&self) -> Result<Client, Failure> {
        Ok(Client::connect(&self.socket)?)
    }

    /// Prints `answer` as JSON for scripts, or with `human` for people.
    pub fn show<A: Serialize>(&self, answer: &A, human: impl FnOnce(&A)) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string(answer).expect("answers serialize")
            );
        } else {
            human(answer);
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), Failure> {
    let cx = Context {
        pin_root: cli.pin_root,
        socket: cli.socket,
        json: cli.json,
    };
    match cli.command {
        Command::Daemon(args) => daemon::run(&cx, args),
        Command::Load(load) => local::load(&cx, load),
        Command::Unload => local::unload(&cx),
        Command::Gate {
            flow_id,
            mode,
            next_expected,
        } => local::gate(&cx, flow_id, mode, next_expected),
        Command::Capture {
            outputs,
            count,
            idle_secs,
        } => local::capture(&cx, outputs, count, idle_secs),
        Command::Status => status::status(&cx),
        Command::Metrics => status::metrics(&cx),
        Command::Keygen { identity } => local::keygen(&identity),
        Command::Ping { address } => status::ping(&cx, address),
        Command::Flow { command } => flows::flow(&cx, command),
        Command::Service { command } => flows::service(&cx, command),
        Command::Migrate {
            service,
            to,
            mode,
            converge,
            deadline_ms,
            pre_dump_rounds,
            hold_ms,
            hold_inputs,
            hold_bytes,
            keep_replica,
            detach,
            calibration,
        } => {
            let request = dataplane_user::migration::Request {
                service,
                to,
                mode,
                converge,
                deadline_ms,
                compare: Default::default(),
                pre_dump_rounds,
                hold: Budget {
                    ms: hold_ms,
                    inputs: hold_inputs,
                    bytes: hold_bytes,
                },
                keep_replica,
            };
            migrate::migrate(&cx, request, detach, calibration)
        }
        Command::Replicate {
            service,
            stop: true,
            ..
        } => migrate::stop_replica(&cx, service),
        Command::Replicate {
            service,
            to,
            converge,
            deadline_ms,
            detach,
            ..
        } => {
            let to = to.expect("clap requires --to without --stop");
            let request = dataplane_user::migration::replica::ReplicaRequest {
                service,
                to,
                converge,
                deadline_ms,
                compare: Default::default(),
                hold: Budget::default(),
            };
            migrate::replicate(&cx, request, detach)
        }
        Command::Watch => migrate::watch(&cx),
        Command::Abort { id } => migrate::abort(&cx, id),
        Command::Calibrate(args) => plan::calibrate(args),
        Command::Plan {
            service,
            mode,
            dirty_rate,
            calibration,
        } => plan::plan(&cx, &service, mode, dirty_rate, calibration),
    }
}
