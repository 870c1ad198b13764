//! `dataplane`: the host admin's command line.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use dataplane_common::{
    FLOW_MIRROR, GATE_DELIVER_ALL, GATE_HOLD_ALL, RECORD_INPUT, RECORD_MIRRORED, counter,
};
use dataplane_user::{
    Dataplane, LoadOptions, LogReader, flow,
    loader::{DEFAULT_PIN_ROOT, MAP_INPUTS, MAP_OUTPUTS, MirrorMode},
    netdev::parse_mac,
};

#[derive(Parser)]
#[command(
    version,
    about = "Packet duplication and replay dataplane for live migration"
)]
struct Cli {
    /// bpffs directory the dataplane is pinned under.
    #[arg(long, global = true, default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Show the configuration, flows and counters.
    Status,
    /// Manage CPS flows.
    Flow {
        #[command(subcommand)]
        command: FlowCommand,
    },
    /// Set the gate of a flow's mirrored inputs on this host.
    Gate {
        /// Flow id, as `flow ls` shows it.
        flow_id: u32,
        #[arg(value_parser = ["deliver", "hold"])]
        mode: String,
    },
    /// Print log records as they arrive.
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

fn mac(text: &str) -> Result<[u8; 6], String> {
    parse_mac(text).ok_or_else(|| format!("{text:?} is not a MAC address like 02:00:00:00:00:01"))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let root = cli.pin_root;
    match cli.command {
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
        Command::Status => {
            let dataplane = Dataplane::open(&root)?;
            let config = dataplane.config()?;
            println!("pinned at {}", root.display());
            println!(
                "snap_len {}  mirror_ifindex {}",
                config.snap_len, config.mirror_ifindex
            );
            print_flows(&dataplane)?;
            println!("{:>18} {:>12}  per CPU", "counter", "total");
            for (index, name) in counter::NAMES.iter().enumerate() {
                let per_cpu = dataplane.counter_per_cpu(index as u32)?;
                let total: u64 = per_cpu.iter().sum();
                println!("{name:>18} {total:>12}  {per_cpu:?}");
            }
        }
        Command::Flow { command } => {
            let mut dataplane = Dataplane::open(&root)?;
            match command {
                FlowCommand::Add {
                    cps,
                    service,
                    mirror,
                } => {
                    let flags = if mirror { FLOW_MIRROR } else { 0 };
                    let key = flow::udp(cps, service);
                    let id = dataplane.add_flow(key, flags)?;
                    println!("flow {id}: {}", flow::display(&key));
                }
                FlowCommand::Rm { cps, service } => {
                    dataplane.remove_flow(&flow::udp(cps, service))?;
                }
                FlowCommand::Ls => print_flows(&dataplane)?,
            }
        }
        Command::Gate { flow_id, mode } => {
            let mode = if mode == "hold" {
                GATE_HOLD_ALL
            } else {
                GATE_DELIVER_ALL
            };
            Dataplane::open(&root)?.set_gate(flow_id, mode)?;
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

fn print_flows(dataplane: &Dataplane) -> anyhow::Result<()> {
    for (key, config) in dataplane.flows()? {
        let sequence = dataplane.sequence(config.flow_id)?;
        let mirror = if config.flags & FLOW_MIRROR != 0 {
            " mirror"
        } else {
            ""
        };
        println!(
            "flow {:>4}: {}{mirror}  last_seq {}  last_delivered {}",
            config.flow_id,
            flow::display(&key),
            sequence.last_seq,
            sequence.last_delivered
        );
    }
    Ok(())
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
