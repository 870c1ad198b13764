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
    Dataplane, LoadOptions, LogReader,
    config::{DEFAULT_CONFIG, DEFAULT_SOCKET, DaemonConfig},
    control::{Client, ClientError},
    daemon::Daemon,
    loader::{DEFAULT_PIN_ROOT, MAP_INPUTS, MAP_OUTPUTS, MirrorMode},
    netdev::parse_mac,
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
        /// Print the migration's id and return at once.
        #[arg(long)]
        detach: bool,
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

impl From<dataplane_user::LoadError> for Failure {
    fn from(e: dataplane_user::LoadError) -> Self {
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
            let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
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
        Command::Migrate {
            service,
            to,
            mode,
            converge,
            deadline_ms,
            detach,
        } => {
            // Watch first, so that no phase is missed.
            let mut watch = Client::connect(&cli.socket)?;
            watch.call("migration.watch", json!({}))?;
            let params = json!({"service": service, "to": to, "mode": mode,
                "converge": converge, "deadline_ms": deadline_ms});
            let id = call("migration.start", params)?["id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if detach {
                show(json_out, json!({"id": id}), |_| println!("{id}"));
                return Ok(());
            }
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let report = loop {
                let line = watch.next_line()?;
                let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                let report = &event["params"];
                if report["id"] != id.as_str() {
                    continue;
                }
                if report["state"] != "running" {
                    break report.clone();
                }
                if terminal {
                    let done: u64 = report["phases"].as_array().map_or(0, |p| {
                        p.iter().filter_map(|p| p["duration_us"].as_u64()).sum()
                    });
                    eprint!(
                        "\r{id}: {:<10} {:>8.1} ms in finished phases, {} image bytes   ",
                        report["phase"].as_str().unwrap_or("?"),
                        done as f64 / 1e3,
                        report["image_bytes"]
                    );
                }
            };
            if terminal {
                eprintln!();
            }
            show(json_out, report.clone(), print_migration);
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

/// Prints `value` as JSON for scripts, or with `human` for people.
fn show(json_out: bool, value: Value, human: impl FnOnce(&Value)) {
    if json_out {
        println!("{value}");
    } else {
        human(&value);
    }
}

/// A migration's report as a table: phases, then the figures.
fn print_migration(v: &Value) {
    let us = |key: &str| v[key].as_u64().unwrap_or(0);
    println!(
        "migration {} of {} to {} ({}): {}",
        v["id"].as_str().unwrap_or("?"),
        v["service"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?"),
        v["mode"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    );
    println!("  {:<10} {:>10} {:>12}", "phase", "start ms", "duration ms");
    for phase in v["phases"].as_array().into_iter().flatten() {
        println!(
            "  {:<10} {:>10.3} {:>12.3}",
            phase["name"].as_str().unwrap_or("?"),
            phase["start_us"].as_u64().unwrap_or(0) as f64 / 1e3,
            phase["duration_us"].as_u64().unwrap_or(0) as f64 / 1e3
        );
    }
    println!(
        "  migration time T_M       {:>10.3} ms",
        us("total_us") as f64 / 1e3
    );
    println!("  checkpoint position S    {:>10}", us("checkpoint_seq"));
    println!("  handover point K         {:>10}", us("handover_seq"));
    println!(
        "  frozen (checkpointed)    {:>10.3} ms",
        us("frozen_us") as f64 / 1e3
    );
    println!("  image data D             {:>10} bytes", us("image_bytes"));
    println!(
        "  replayed                 {:>10} inputs at {:.0}/s",
        us("replayed"),
        v["replay_rate"].as_f64().unwrap_or(0.0)
    );
    println!("  outputs compared         {:>10}", us("compared"));
    println!("  flip                     {:>10} ns", us("flip_ns"));
    if let Some(error) = v["error"].as_str() {
        println!("  error: {error}");
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
