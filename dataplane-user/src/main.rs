//! `dataplane`: the command line of host admins and migration scripts.
//!
//! `daemon` runs the daemon; `load`, `unload`, `gate` and `capture` work on
//! the pinned dataplane directly; every other command asks the daemon over
//! its control socket. Exit codes: 0 done, 1 the daemon answered with an
//! error, 2 bad usage, 3 the daemon cannot be reached, 4 a local failure.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use dataplane_common::{
    GATE_DELIVER_ALL, GATE_HOLD_ALL, GATE_SEQUENCED, Gate, RECORD_INPUT, RECORD_MIRRORED,
};
use dataplane_user::{
    config::{DEFAULT_CALIBRATION, DEFAULT_CONFIG, DEFAULT_SOCKET, DaemonConfig},
    control::{Client, ClientError},
    criu::{Criu, DEFAULT_CRIU},
    daemon::Daemon,
    host::netdev::parse_mac,
    kernel::{
        loader::{DEFAULT_PIN_ROOT, Dataplane, LoadOptions, MAP_INPUTS, MAP_OUTPUTS, MirrorMode},
        logs::LogReader,
    },
    planning::{
        calibrate,
        model::{Calibration, Method, Prediction, Workload, error_pct},
        policy::StopPolicy,
    },
    report::Report,
};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    version,
    about = "Packet duplication and replay dataplane for live migration"
)]
struct Cli {
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
enum Command {
    /// Run the daemon: adopt or load the dataplane, serve the control socket and the peer link.
    Daemon {
        /// Configuration file; flags below override its keys.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Service-facing interface (overrides `interface`).
        #[arg(long)]
        interface: Option<String>,
        /// Link to the peer host (overrides `peer_interface`).
        #[arg(long)]
        peer_interface: Option<String>,
        /// MAC of the peer host on that link (overrides `peer_mac`).
        #[arg(long)]
        peer_mac: Option<String>,
        /// Peer-link listen address (overrides `peer_listen`).
        #[arg(long)]
        peer_listen: Option<SocketAddr>,
    },
    /// Load and attach the kernel programs, pinned so they outlive this command.
    Load {
        /// Service-facing interface: CPS inputs arrive and outputs leave here.
        #[arg(long)]
        interface: String,
        /// Link to the peer host, for mirror copies.
        #[arg(long)]
        peer_interface: Option<String>,
        /// MAC address of the peer host on that link (default: broadcast).
        #[arg(long, value_parser = mac)]
        peer_mac: Option<[u8; 6]>,
        /// Most bytes of a frame to log (0: whole frames).
        #[arg(long, default_value_t = 0)]
        snap_len: u32,
        /// Input log size in MiB (a power of two).
        #[arg(long, default_value_t = 64)]
        input_ring_mib: u32,
        /// Output log size in MiB (a power of two).
        #[arg(long, default_value_t = 16)]
        output_ring_mib: u32,
        /// Make mirror copies by XDP devmap broadcast to the peer interface and to
        /// this veth, behind which the service sits (default: TC clone).
        #[arg(long, requires = "deliver_mac")]
        deliver_interface: Option<String>,
        /// MAC address of the service side of the --deliver-interface veth.
        #[arg(long, value_parser = mac, requires = "deliver_interface")]
        deliver_mac: Option<[u8; 6]>,
    },
    /// Detach the programs and remove every pin.
    Unload,
    /// The daemon's view: interfaces, programs, flows, counters, services, migrations.
    Status,
    /// Counters and registry sizes in the Prometheus text format.
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
        /// The destination daemon's peer-link address, HOST:PORT.
        #[arg(long)]
        to: SocketAddr,
        /// `standby` (checkpoint the standby instance: the serving one never
        /// stops) or `leave-running` (checkpoint the serving one).
        #[arg(long, default_value = "leave-running")]
        mode: String,
        /// Consecutive matching outputs needed for the handover.
        #[arg(long, default_value_t = 10)]
        converge: u32,
        /// Time allowed for restore, replay and convergence, in ms.
        #[arg(long, default_value_t = 10_000)]
        deadline_ms: u64,
        /// Take at most this many CRIU pre-dump rounds (kaur2020) before
        /// the checkpoint, while the instance serves unheld (a kernel
        /// without memory tracking gets a single dump).
        #[arg(long, default_value_t = 0)]
        pre_dump_rounds: usize,
        /// Print the migration's id and return at once.
        #[arg(long)]
        detach: bool,
        /// The calibration to print predictions from (default: the
        /// configuration's `calibration`); none there, no predictions.
        #[arg(long)]
        calibration: Option<PathBuf>,
    },
    /// Measure this host's CRIU costs on a synthetic service (dump, copy
    /// and restore per size), fit the migration model (calagna2023's PAM)
    /// and save it; with --from-reports, fit our live modes' costs to real
    /// migrations' reports on top of the saved CRIU terms.
    Calibrate {
        /// State sizes of the synthetic service, MiB.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        sizes: Vec<u64>,
        /// Dumps and restores per size.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Where to save it (default: the configuration's `calibration`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Finished migrations to fit the live modes' costs to: migration.status
        /// JSON (a report, an array of them, or one a line) or `--json status`.
        #[arg(long)]
        from_reports: Option<PathBuf>,
        /// The CRIU binary.
        #[arg(long, default_value = DEFAULT_CRIU)]
        criu: PathBuf,
        /// The CPS period the reports' migrations ran at, µs (their replay).
        #[arg(long, default_value_t = 1000)]
        period_us: u64,
        /// Your service's own program instead of the synthetic service
        /// (after `--`; `{mib}` in its arguments becomes each size): run
        /// in namespaces of its own, it must hold that much resident
        /// anonymous memory once started.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Predict a registered service's migration time T_M and downtime T_D
    /// by method, from its size, its dirty rate and this host's calibration.
    Plan {
        service: String,
        /// The live mode to show phase by phase.
        #[arg(long, value_parser = ["standby", "leave-running"])]
        mode: Option<String>,
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
    /// Check the peer link to another daemon: handshake and round trip.
    Ping {
        /// The other daemon's peer-link address, HOST:PORT.
        address: SocketAddr,
    },
    /// Set the gate of a flow's mirrored inputs on this host (on the pins).
    Gate {
        /// Flow id, as `flow ls` shows it.
        flow_id: u32,
        #[arg(value_parser = ["deliver", "hold", "sequenced"])]
        mode: String,
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
enum FlowCommand {
    /// Start numbering and logging a UDP flow.
    Add {
        /// The CPS end, ADDR:PORT.
        #[arg(long)]
        cps: SocketAddr,
        /// The service end, ADDR:PORT.
        #[arg(long)]
        service: SocketAddr,
        /// Mirror the flow's inputs to the peer host.
        #[arg(long)]
        mirror: bool,
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
enum ServiceCommand {
    /// Register a service: its process, network namespace and flows.
    Add {
        name: String,
        /// The service's process (the root of its PID namespace, if any).
        #[arg(long)]
        pid: u32,
        /// Its network namespace, e.g. /run/netns/src.
        #[arg(long)]
        netns: Option<String>,
        /// A flow that feeds it, CPS_ADDR:PORT=SERVICE_ADDR:PORT; repeatable.
        #[arg(long = "flow", value_parser = flow_spec, required = true)]
        flows: Vec<(SocketAddr, SocketAddr)>,
        /// A standby instance's process, fed by the mirror.
        #[arg(long)]
        standby_pid: Option<u32>,
    },
    /// Forget a service.
    Rm { name: String },
    /// List services.
    Ls,
}

fn mac(text: &str) -> Result<[u8; 6], String> {
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
enum Failure {
    /// The daemon answered with an error (1).
    Daemon(ClientError),
    /// The daemon could not be reached (3).
    Unreachable(ClientError),
    /// Anything else (4).
    Local(anyhow::Error),
    /// A migration failed and was rolled back (5).
    Migration(String),
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Daemon(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
        Err(Failure::Local(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(4)
        }
        Err(Failure::Migration(e)) => {
            eprintln!("migration failed, the service keeps running on the source: {e}");
            ExitCode::from(5)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let (root, json_out) = (cli.pin_root, cli.json);
    let call = |method: &str, params: Value| -> Result<Value, Failure> {
        Ok(Client::connect(&cli.socket)?.call(method, params)?)
    };
    match cli.command {
        Command::Daemon {
            config,
            interface,
            peer_interface,
            peer_mac,
            peer_listen,
        } => {
            let mut config = match (DaemonConfig::read(&config), &interface) {
                (Ok(config), _) => config,
                // Without a file, flags alone may configure the daemon.
                (Err(_), Some(interface)) if !config.exists() => {
                    DaemonConfig::parse(&format!("interface = {interface:?}")).context("flags")?
                }
                (Err(e), _) => return Err(Failure::Local(e.into())),
            };
            config.interface = interface.unwrap_or(config.interface);
            config.peer_interface = peer_interface.or(config.peer_interface);
            config.peer_mac = peer_mac.or(config.peer_mac);
            config.peer_listen = peer_listen.or(config.peer_listen);
            if root != Path::new(DEFAULT_PIN_ROOT) {
                config.pin_root = root;
            }
            if cli.socket != Path::new(DEFAULT_SOCKET) {
                config.socket = cli.socket.clone();
            }
            config.load_options().context("configuration")?;
            let runtime = daemon_runtime(config.realtime_priority)?;
            runtime
                .block_on(async { Daemon::start(config)?.serve().await })
                .context("daemon")?;
        }
        Command::Load {
            interface,
            peer_interface,
            peer_mac,
            snap_len,
            input_ring_mib,
            output_ring_mib,
            deliver_interface,
            deliver_mac,
        } => {
            let mirror_mode = match (deliver_interface, deliver_mac) {
                (Some(deliver_interface), Some(deliver_mac)) => MirrorMode::Devmap {
                    deliver_interface,
                    deliver_mac,
                },
                _ => MirrorMode::Clone,
            };
            let options = LoadOptions {
                pin_root: root,
                peer_interface,
                peer_mac,
                snap_len,
                input_ring_bytes: input_ring_mib << 20,
                output_ring_bytes: output_ring_mib << 20,
                mirror_mode,
                ..LoadOptions::new(interface)
            };
            let dataplane = Dataplane::load(&options)?;
            println!(
                "loaded on {} (pinned at {})",
                options.interface,
                dataplane.pin_root().display()
            );
        }
        Command::Unload => {
            Dataplane::unload(&root)?;
            println!("unloaded; nothing left at {}", root.display());
        }
        Command::Status => show(json_out, call("status", json!({}))?, print_status),
        Command::Metrics => {
            let page = call("metrics", json!({}))?;
            print!("{}", page.as_str().unwrap_or_default());
        }
        Command::Flow { command } => match command {
            FlowCommand::Add {
                cps,
                service,
                mirror,
            } => show(
                json_out,
                call(
                    "flow.add",
                    json!({"cps": cps, "service": service, "mirror": mirror}),
                )?,
                |v| {
                    println!(
                        "flow {}: {}",
                        v["id"],
                        v["flow"].as_str().unwrap_or_default()
                    )
                },
            ),
            FlowCommand::Rm { cps, service } => show(
                json_out,
                call("flow.remove", json!({"cps": cps, "service": service}))?,
                |v| println!("removed {}", v["removed"].as_str().unwrap_or_default()),
            ),
            FlowCommand::Ls => show(json_out, call("flow.list", json!({}))?, print_flows),
        },
        Command::Service { command } => match command {
            ServiceCommand::Add {
                name,
                pid,
                netns,
                flows,
                standby_pid,
            } => {
                let flows: Vec<Value> = flows
                    .iter()
                    .map(|(cps, service)| json!({"cps": cps, "service": service}))
                    .collect();
                let params = json!({"name": name, "pid": pid, "netns": netns, "flows": flows,
                                    "standby_pid": standby_pid});
                show(json_out, call("service.register", params)?, |_| {
                    println!("registered {name}")
                })
            }
            ServiceCommand::Rm { name } => show(
                json_out,
                call("service.unregister", json!({"name": name}))?,
                |_| println!("unregistered {name}"),
            ),
            ServiceCommand::Ls => show(json_out, call("service.list", json!({}))?, print_services),
        },
        Command::Calibrate {
            sizes,
            repeat,
            out,
            from_reports,
            criu,
            period_us,
            command,
        } => {
            let out = calibration_path(out);
            run_calibrate(
                &sizes,
                repeat,
                &out,
                from_reports.as_deref(),
                criu,
                period_us,
                &command,
            )?;
        }
        Command::Plan {
            service,
            mode,
            dirty_rate,
            calibration,
        } => {
            let path = calibration_path(calibration);
            let calibration = read_calibration(&path)?;
            let plan = plan(&call, &service, dirty_rate, &calibration)?;
            show(
                json_out,
                serde_json::to_value(&plan).unwrap_or_default(),
                |_| print_plan(&plan, &path, &calibration, mode.as_deref()),
            );
        }
        Command::Migrate {
            service,
            to,
            mode,
            converge,
            deadline_ms,
            pre_dump_rounds,
            detach,
            calibration,
        } => {
            // The prediction needs the instance's size before it is gone.
            let predicted = if detach {
                None
            } else {
                predict_migration(&call, &service, &mode, calibration)
            };
            // Watch first, so that no phase is missed.
            let mut watch = Client::connect(&cli.socket)?;
            watch.call("migration.watch", json!({}))?;
            let params = json!({"service": service, "to": to, "mode": mode,
                "converge": converge, "deadline_ms": deadline_ms,
                "pre_dump_rounds": pre_dump_rounds});
            let id = call("migration.start", params)?["id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if detach {
                show(json_out, json!({"id": id}), |_| println!("{id}"));
                return Ok(());
            }
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            // Notifications come on a thread of their own, so that the
            // progress line can tick between them.
            let (lines, notifications) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                while let Ok(line) = watch.next_line() {
                    if lines.send(line).is_err() {
                        break;
                    }
                }
            });
            let started = std::time::Instant::now();
            let mut progress = Progress::default();
            let report = loop {
                let line = match notifications.recv_timeout(Duration::from_millis(100)) {
                    Ok(line) => line,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if terminal {
                            progress.show(&id, started.elapsed());
                        }
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(anyhow::anyhow!("the daemon closed the watch").into());
                    }
                };
                let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                let report = &event["params"];
                if report["id"] != id.as_str() {
                    continue;
                }
                if report["state"] != "running" {
                    break report.clone();
                }
                progress.update(report);
                if terminal {
                    progress.show(&id, started.elapsed());
                }
            };
            if terminal {
                eprintln!();
            }
            let mut shown = report.clone();
            if let Some(p) = &predicted {
                shown["predicted"] = serde_json::to_value(p).unwrap_or_default();
            }
            show(json_out, shown, |v| print_migration(v, predicted.as_ref()));
            if let Some(error) = report["error"].as_str() {
                return Err(Failure::Migration(error.to_string()));
            }
        }
        Command::Watch => {
            let mut client = Client::connect(&cli.socket)?;
            client.call("migration.watch", json!({}))?;
            loop {
                let line = client.next_line()?;
                if json_out {
                    print!("{line}");
                } else {
                    let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    println!("{} {}", v["method"].as_str().unwrap_or("?"), v["params"]);
                }
            }
        }
        Command::Abort { id } => show(json_out, call("migration.abort", json!({"id": id}))?, |v| {
            println!("{v}")
        }),
        Command::Ping { address } => show(
            json_out,
            call("peer.ping", json!({"address": address}))?,
            |v| {
                println!(
                    "peer {} (protocol {}) answered in {} us",
                    v["host"].as_str().unwrap_or("?"),
                    v["version"],
                    v["rtt_us"]
                )
            },
        ),
        Command::Gate {
            flow_id,
            mode,
            next_expected,
        } => {
            let mode = match mode.as_str() {
                "hold" => GATE_HOLD_ALL,
                "sequenced" => GATE_SEQUENCED,
                _ => GATE_DELIVER_ALL,
            };
            let gate = Gate {
                mode,
                next_expected,
                ..Default::default()
            };
            Dataplane::open(&root)?.set_gate(flow_id, gate)?;
        }
        Command::Capture {
            outputs,
            count,
            idle_secs,
        } => {
            let dataplane = Dataplane::open(&root)?;
            let ring = dataplane.open_log(if outputs { MAP_OUTPUTS } else { MAP_INPUTS })?;
            capture(ring, count, Duration::from_secs(idle_secs))?;
        }
    }
    Ok(())
}

/// What `dataplane migrate` shows while a migration runs: the phase, the
/// time since it started, and the image bytes sent with their rate.
#[derive(Default)]
struct Progress {
    phase: String,
    bytes: u64,
    /// When the transfer's first bytes were reported, and how many.
    first: Option<(std::time::Instant, u64)>,
    rate: f64,
}

impl Progress {
    fn update(&mut self, report: &Value) {
        self.phase = report["phase"].as_str().unwrap_or("?").to_string();
        self.bytes = report["image_bytes"].as_u64().unwrap_or(0);
        if self.bytes > 0 {
            let (at, bytes) = *self
                .first
                .get_or_insert((std::time::Instant::now(), self.bytes));
            let seconds = at.elapsed().as_secs_f64();
            if seconds > 0.0 {
                self.rate = self.bytes.saturating_sub(bytes) as f64 / seconds;
            }
        }
    }

    fn show(&self, id: &str, elapsed: Duration) {
        let rate = if self.rate > 0.0 {
            format!(" at {:.1} MiB/s", self.rate / (1 << 20) as f64)
        } else {
            String::new()
        };
        eprint!(
            "\r{id}: {:<10} {:>7.2} s, image data {:.2} MiB{rate}      ",
            self.phase,
            elapsed.as_secs_f64(),
            self.bytes as f64 / (1 << 20) as f64
        );
    }
}

/// The daemon's runtime; with a `realtime_priority`, every thread of it
/// (this one too) runs at that SCHED_FIFO priority.
fn daemon_runtime(realtime_priority: u8) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if realtime_priority > 0 {
        dataplane_user::host::tasks::run_realtime(realtime_priority).with_context(|| {
            format!("realtime_priority {realtime_priority}: SCHED_FIFO for the daemon")
        })?;
        // Threads start as ordinary tasks (reset-on-fork): each lifts itself.
        builder.on_thread_start(move || {
            if let Err(e) = dataplane_user::host::tasks::run_realtime(realtime_priority) {
                tracing::warn!("a daemon thread stays an ordinary task: {e}");
            }
        });
    }
    builder.build().context("starting tokio")
}

/// Prints `value` as JSON for scripts, or with `human` for people.
fn show(json_out: bool, value: Value, human: impl FnOnce(&Value)) {
    if json_out {
        println!("{value}");
    } else {
        human(&value);
    }
}

/// A migration's report as a table: phases, then the figures; with the
/// model's prediction beside them when there is one.
fn print_migration(v: &Value, predicted: Option<&Prediction>) {
    let us = |key: &str| v[key].as_u64().unwrap_or(0);
    println!(
        "migration {} of {} to {} ({}): {}",
        v["id"].as_str().unwrap_or("?"),
        v["service"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?"),
        v["mode"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    );
    let column = if predicted.is_some() {
        format!(" {:>12}", "predicted ms")
    } else {
        String::new()
    };
    println!(
        "  {:<10} {:>10} {:>12}{column}",
        "phase", "start ms", "duration ms"
    );
    for phase in v["phases"].as_array().into_iter().flatten() {
        let name = phase["name"].as_str().unwrap_or("?");
        let column = predicted
            .and_then(|p| p.phases.iter().find(|(n, _)| n == name))
            .map(|(_, us)| format!(" {:>12.3}", us / 1e3))
            .unwrap_or_default();
        println!(
            "  {:<10} {:>10.3} {:>12.3}{column}",
            name,
            phase["start_us"].as_u64().unwrap_or(0) as f64 / 1e3,
            phase["duration_us"].as_u64().unwrap_or(0) as f64 / 1e3
        );
    }
    // "predicted X ms (+E%)" after a measured figure in µs.
    let beside = |measured_us: u64, predicted_us: Option<f64>| {
        predicted_us.map_or(String::new(), |p| {
            format!(
                "   predicted {:>9.3} ms ({:+.0}%)",
                p / 1e3,
                error_pct(p, measured_us as f64)
            )
        })
    };
    println!(
        "  migration time T_M       {:>10.3} ms{}",
        us("total_us") as f64 / 1e3,
        beside(us("total_us"), predicted.map(|p| p.total_us))
    );
    println!("  checkpoint position S    {:>10}", us("checkpoint_seq"));
    println!("  handover point K         {:>10}", us("handover_seq"));
    println!(
        "  frozen (checkpointed)    {:>10.3} ms{}",
        us("frozen_us") as f64 / 1e3,
        beside(us("frozen_us"), predicted.map(|p| p.frozen_us))
    );
    println!("  image data D             {:>10} bytes", us("image_bytes"));
    if let Some(pre_dump) = v["pre_dump"].as_str() {
        println!("  pre-dump                 {pre_dump}");
    }
    println!(
        "  replayed                 {:>10} inputs at {:.0}/s",
        us("replayed"),
        v["replay_rate"].as_f64().unwrap_or(0.0)
    );
    println!("  outputs compared         {:>10}", us("compared"));
    println!("  flip                     {:>10} ns", us("flip_ns"));
    println!(
        "  serving instance held    {:>10.3} ms (T_D: its inputs not delivered){}",
        us("held_us") as f64 / 1e3,
        // Standby mode holds nothing of the serving instance's.
        beside(
            us("held_us"),
            predicted
                .filter(|_| us("held_us") > 0)
                .map(|p| p.downtime_us)
        )
    );
    let load = |key: &str| v["load"][key].as_u64().unwrap_or(0) as f64 / 1e3;
    println!(
        "  CPU time, source         {:>10.3} ms daemon, {:.3} ms CRIU",
        load("source_daemon_us"),
        load("source_criu_us")
    );
    println!(
        "  CPU time, destination    {:>10.3} ms daemon, {:.3} ms CRIU",
        load("destination_daemon_us"),
        load("destination_criu_us")
    );
    if let Some(error) = v["error"].as_str() {
        println!("  error: {error}");
    }
}

/// The calibration file: `flag`, else the configuration's key, else the default.
fn calibration_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        DaemonConfig::read(Path::new(DEFAULT_CONFIG))
            .ok()
            .map(|c| c.calibration)
    })
    .unwrap_or_else(|| PathBuf::from(DEFAULT_CALIBRATION))
}

fn read_calibration(path: &Path) -> anyhow::Result<Calibration> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "no calibration at {}: run `dataplane calibrate` first",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a calibration", path.display()))
}

/// Migration reports from a file: one report, an array of them, one a
/// line, or `dataplane --json status` (its `migrations`).
fn read_reports(path: &Path) -> anyhow::Result<Vec<Report>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let values: Vec<Value> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(all)) => all,
        Ok(Value::Object(status)) if status.contains_key("migrations") => {
            status["migrations"].as_array().cloned().unwrap_or_default()
        }
        Ok(one) => vec![one],
        Err(_) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: not migration.status JSON", path.display()))?,
    };
    values
        .into_iter()
        .map(|v| serde_json::from_value(v).context("a migration report"))
        .collect()
}

/// `dataplane calibrate`: measure (or fit reports), save, print the fit.
fn run_calibrate(
    sizes: &[u64],
    repeat: usize,
    out: &Path,
    from_reports: Option<&Path>,
    criu: PathBuf,
    period_us: u64,
    command: &[String],
) -> anyhow::Result<()> {
    let command = (!command.is_empty()).then_some(command);
    let mut calibration = match from_reports {
        // The CRIU terms stay as measured; the live costs sit on top of them.
        Some(_) => read_calibration(out)?,
        None => {
            let criu = Criu::new(criu);
            let start = std::time::Instant::now();
            let mut mem_track = false;
            for _ in 0..3 {
                mem_track = criu.features()?.mem_track.unwrap_or(false);
            }
            let check_us = start.elapsed().as_secs_f64() * 1e6 / 3.0;
            let scratch = calibrate::scratch_dir(None);
            let mut samples = Vec::new();
            for &mib in sizes {
                for _ in 0..repeat.max(1) {
                    let sample = calibrate::sample(&criu, (mib << 20) as usize, &scratch, command)
                        .with_context(|| format!("{mib} MiB"))?;
                    eprintln!(
                        "  {mib:>4} MiB: dump {:7.1} ms  copy {:6.1} ms  restore {:7.1} ms",
                        sample.dump_us / 1e3,
                        sample.copy_us / 1e3,
                        sample.restore_us / 1e3
                    );
                    samples.push(sample);
                }
            }
            // Live costs fitted earlier sat on the old CRIU terms: refit them.
            let mut calibration = Calibration {
                host: nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                created: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                mem_track,
                service: command.map(|c| c.join(" ")),
                ..Calibration::default()
            };
            calibration.criu.check_us = check_us;
            calibration.fit_samples(samples);
            calibration
        }
    };
    let reports = from_reports.map(read_reports).transpose()?;
    if let Some(reports) = &reports {
        calibration.fit_reports(reports);
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&calibration).expect("serializes");
    std::fs::write(out, text).with_context(|| format!("{}", out.display()))?;
    print_calibration(
        &calibration,
        reports.as_deref(),
        1e6 / period_us.max(1) as f64,
    );
    println!("saved to {}", out.display());
    Ok(())
}

const MIB: f64 = 1048576.0;

/// The fitted lines, and how far each sample or report is from them.
fn print_calibration(c: &Calibration, reports: Option<&[Report]>, input_rate: f64) {
    let k = &c.criu;
    println!(
        "CRIU on {} (memory tracking: {}), {} samples of {}",
        c.host,
        if c.mem_track {
            "yes"
        } else {
            "no: pre-copy is a single dump"
        },
        c.samples.len(),
        c.service_name()
    );
    println!("  {:<26} {:>10} {:>12}", "term", "fixed ms", "ms per MiB");
    for (name, line) in [
        ("dump T^d (Eq. 2, 12, 13)", k.dump),
        ("frozen (Eq. 12)", k.frozen),
        ("copy T^net (per MiB of D)", k.copy),
        ("restore T^r (Eq. 16)", k.restore),
    ] {
        println!(
            "  {name:<26} {:>10.2} {:>12.3}",
            line.fixed / 1e3,
            line.slope * MIB / 1e3
        );
    }
    println!(
        "  image D (Eq. 14)           {:.0} KiB + {:.3} x M",
        k.image.fixed / 1024.0,
        k.image.slope
    );
    println!("  FEATURE_CHECK              {:.2} ms", k.check_us / 1e3);
    if c.criu_reports > 0 {
        println!(
            "  dump, frozen and restore: fixed costs from {} migrations' CRIU times, slopes \
             from the samples",
            c.criu_reports
        );
    }
    if !c.samples.is_empty() {
        println!(
            "  {:>7} {:>7}  {:>15} {:>15} {:>15} {:>15}",
            "M MiB", "D MiB", "dump ms (fit)", "frozen (fit)", "copy (fit)", "restore (fit)"
        );
    }
    let cell =
        |measured: f64, fitted: f64| format!("{:>6.1} ({:>6.1})", measured / 1e3, fitted / 1e3);
    for s in &c.samples {
        let m = s.state_bytes;
        println!(
            "  {:>7.2} {:>7.2}  {:>15} {:>15} {:>15} {:>15}",
            m / MIB,
            s.image_bytes / MIB,
            cell(s.dump_us, k.dump.at(m)),
            cell(s.frozen_us, k.frozen.at(m)),
            cell(s.copy_us, k.copy.at(s.image_bytes)),
            cell(s.restore_us, k.restore.at(m))
        );
    }
    for (name, live) in [("leave-running", &c.leave_running), ("standby", &c.standby)] {
        let Some(l) = live else {
            println!("{name}: no reports fitted (`dataplane calibrate --from-reports FILE`)");
            continue;
        };
        println!(
            "{name}, from {} reports, ms: prepare {:.1}; checkpoint {:.1} + {:.2} x dump; \
             transfer {:.1} + {:.2} per MiB; restore {:.1} + {:.2} x CRIU's, then replay at \
             {:.0}/s; converge {:.1}; cutover {:.1}; announce {:.1}; finish {:.1} + {:.2} per MiB",
            l.reports,
            l.prepare_us / 1e3,
            l.checkpoint.fixed / 1e3,
            l.checkpoint.slope,
            l.transfer.fixed / 1e3,
            l.transfer.slope * MIB / 1e3,
            l.restore.fixed / 1e3,
            l.restore.slope,
            l.replay_rate,
            l.converge_us / 1e3,
            l.cutover_us / 1e3,
            l.announce_us / 1e3,
            l.finish.fixed / 1e3,
            l.finish.slope * MIB / 1e3
        );
    }
    for r in reports.into_iter().flatten().filter(|r| r.state == "done") {
        let work = Workload {
            state_bytes: c.state_of(r),
            dirty_rate: 0.0,
            input_rate,
        };
        let p = c.predict(r.mode.into(), &work);
        println!(
            "  {:<16} {:<14} D {:>7.2} MiB  T_M {:>8.1} ms, model {:>8.1} ms ({:+.1}%)",
            r.id,
            Method::from(r.mode).name(),
            r.image_bytes as f64 / MIB,
            r.total_us as f64 / 1e3,
            p.total_us / 1e3,
            error_pct(p.total_us, r.total_us as f64)
        );
    }
}

/// What `dataplane plan` found and predicts.
#[derive(serde::Serialize)]
struct Plan {
    service: String,
    pid: u32,
    state_bytes: u64,
    standby_pid: Option<u32>,
    standby_state_bytes: Option<u64>,
    workload: Workload,
    predictions: Vec<Prediction>,
}

/// Sizes the service's instances, measures its input rate, and predicts
/// every method.
fn plan(
    call: &dyn Fn(&str, Value) -> Result<Value, Failure>,
    name: &str,
    dirty_rate: f64,
    calibration: &Calibration,
) -> Result<Plan, Failure> {
    let services = call("service.list", json!({}))?;
    let service = services
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == name)
        .ok_or_else(|| Failure::Local(anyhow::anyhow!("no service {name:?} is registered")))?;
    let pid = service["pid"].as_u64().unwrap_or(0) as u32;
    let state_bytes = calibrate::state_bytes(pid)
        .with_context(|| format!("the size of service {name} (process {pid})"))?;
    let standby_pid = service["standby_pid"].as_u64().map(|p| p as u32);
    let standby_state_bytes = standby_pid
        .map(calibrate::state_bytes)
        .transpose()
        .with_context(|| format!("the size of {name}'s standby"))?;
    let workload = Workload {
        state_bytes: state_bytes as f64,
        dirty_rate,
        input_rate: input_rate(call, service)?,
    };
    let rounds = calibration.precopy_rounds(&workload, StopPolicy::default().max_rounds);
    let predictions = [
        Method::StopAndCopy,
        Method::PreCopy { rounds },
        Method::LeaveRunning,
        Method::Standby,
    ]
    .into_iter()
    .map(|method| {
        // Standby mode checkpoints the standby: its size counts.
        let work = match (method, standby_state_bytes) {
            (Method::Standby, Some(m)) => Workload {
                state_bytes: m as f64,
                ..workload
            },
            _ => workload,
        };
        calibration.predict(method, &work)
    })
    .collect();
    Ok(Plan {
        service: name.to_string(),
        pid,
        state_bytes,
        standby_pid,
        standby_state_bytes,
        workload,
        predictions,
    })
}

/// Inputs per second on the service's flow, over 200 ms of its counter.
fn input_rate(
    call: &dyn Fn(&str, Value) -> Result<Value, Failure>,
    service: &Value,
) -> Result<f64, Failure> {
    let flow = &service["flows"][0];
    let last_seq = || -> Result<Option<u64>, Failure> {
        let flows = call("flow.list", json!({}))?;
        Ok(flows
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["cps"] == flow["cps"] && f["service"] == flow["service"])
            .and_then(|f| f["last_seq"].as_u64()))
    };
    let start = std::time::Instant::now();
    let before = last_seq()?;
    std::thread::sleep(Duration::from_millis(200));
    let after = last_seq()?;
    Ok(match (before, after) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / start.elapsed().as_secs_f64(),
        _ => 0.0,
    })
}

fn print_plan(plan: &Plan, path: &Path, c: &Calibration, mode: Option<&str>) {
    let mib = |b: u64| b as f64 / MIB;
    print!(
        "service {}: process {}, M = {:.2} MiB (Anonymous in /proc/{}/smaps_rollup)",
        plan.service,
        plan.pid,
        mib(plan.state_bytes),
        plan.pid
    );
    match (plan.standby_pid, plan.standby_state_bytes) {
        (Some(pid), Some(m)) => println!("; standby {pid}, {:.2} MiB", mib(m)),
        _ => println!("; no standby"),
    }
    println!(
        "inputs: {:.0}/s on its flow; dirty rate R = {:.0} B/s from --dirty-rate (not measured: \
         this kernel has no soft-dirty tracking; only pre-copy rounds depend on it)",
        plan.workload.input_rate, plan.workload.dirty_rate
    );
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(c.created);
    let reports = |l: &Option<dataplane_user::planning::model::LiveCosts>| {
        l.as_ref().map_or(0, |l| l.reports)
    };
    println!(
        "calibration {} (host {}, {} min old): CRIU from {} dumps of {}, live costs from \
         {} leave-running and {} standby reports",
        path.display(),
        c.host,
        age / 60,
        c.samples.len(),
        c.service_name(),
        reports(&c.leave_running),
        reports(&c.standby)
    );
    println!(
        "  {:<24} {:>10} {:>10} {:>10} {:>8}",
        "method", "T_M ms", "T_D ms", "frozen ms", "D MiB"
    );
    for p in &plan.predictions {
        println!(
            "  {:<24} {:>10.1} {:>10.1} {:>10.1} {:>8.2}",
            p.method.name(),
            p.total_us / 1e3,
            p.downtime_us / 1e3,
            p.frozen_us / 1e3,
            p.image_bytes / MIB
        );
    }
    let chosen = match mode {
        Some("leave-running") => Method::LeaveRunning,
        Some(_) => Method::Standby,
        None => return,
    };
    if let Some(p) = plan.predictions.iter().find(|p| p.method == chosen) {
        let phases: Vec<String> = p
            .phases
            .iter()
            .map(|(name, us)| format!("{name} {:.1}", us / 1e3))
            .collect();
        println!("{} phases, ms: {}", chosen.name(), phases.join(", "));
    }
}

/// The prediction for `dataplane migrate`, when this host is calibrated.
fn predict_migration(
    call: &dyn Fn(&str, Value) -> Result<Value, Failure>,
    service: &str,
    mode: &str,
    calibration: Option<PathBuf>,
) -> Option<Prediction> {
    let calibration = read_calibration(&calibration_path(calibration)).ok()?;
    let method = if mode == "standby" {
        Method::Standby
    } else {
        Method::LeaveRunning
    };
    match plan(call, service, 0.0, &calibration) {
        Ok(plan) => plan.predictions.into_iter().find(|p| p.method == method),
        Err(_) => None,
    }
}

fn print_status(v: &Value) {
    println!(
        "dataplane {}  pinned at {}  {}  up {} s",
        v["version"].as_str().unwrap_or("?"),
        v["pin_root"].as_str().unwrap_or("?"),
        if v["adopted"] == true {
            "re-adopted"
        } else {
            "loaded"
        },
        v["uptime_s"]
    );
    println!(
        "interfaces: service {}  peer {}",
        v["interfaces"]["service"], v["interfaces"]["peer"]
    );
    let programs: Vec<&str> = v["programs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!("programs: {}", programs.join(" "));
    print_flows(&v["flows"]);
    print_services(&v["services"]);
    println!("counters:");
    if let Some(counters) = v["counters"].as_object() {
        for (name, value) in counters {
            println!("  {name:>18} {value}");
        }
    }
}

fn print_flows(flows: &Value) {
    println!(
        "{:>4}  {:<48} {:>6} {:>12} {:>14}",
        "id", "flow", "mirror", "last_seq", "last_delivered"
    );
    for f in flows.as_array().into_iter().flatten() {
        let name = format!(
            "{} -> {}",
            f["cps"].as_str().unwrap_or("?"),
            f["service"].as_str().unwrap_or("?")
        );
        println!(
            "{:>4}  {name:<48} {:>6} {:>12} {:>14}",
            f["id"], f["mirror"], f["last_seq"], f["last_delivered"]
        );
    }
}

fn print_services(services: &Value) {
    for s in services.as_array().into_iter().flatten() {
        println!(
            "service {}: pid {} netns {} standby {} flows {}",
            s["name"].as_str().unwrap_or("?"),
            s["pid"],
            s["netns"],
            s["standby_pid"],
            s["flows"]
        );
    }
}

fn capture(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    count: Option<u64>,
    idle: Duration,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut reader = LogReader::spawn(ring, 4096).context("watching the log")?;
        let mut seen = 0;
        while count.is_none_or(|c| seen < c) {
            let Ok(record) = tokio::time::timeout(idle, reader.next()).await else {
                break;
            };
            let h = record.header;
            let kind = match h.kind {
                RECORD_INPUT => "input",
                RECORD_MIRRORED => "mirrored",
                _ => "output",
            };
            println!(
                "{kind:<8} flow {} seq {} t {} ns if {} len {} captured {}",
                h.flow_id, h.seq, h.timestamp_ns, h.ifindex, h.frame_len, h.captured_len
            );
            seen += 1;
        }
        if count.is_some_and(|c| seen < c) {
            bail!("{seen} records arrived before the log went idle");
        }
        Ok(())
    })
}
