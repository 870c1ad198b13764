//! Commands that work on the pinned dataplane directly, without the daemon:
//! `load`, `unload`, `gate`, `capture`.
use std::time::Duration;

use anyhow::{Context as _, bail};
use dataplane_common::{
    GATE_DELIVER_ALL, GATE_HOLD_ALL, GATE_SEQUENCED, Gate, RECORD_INPUT, RECORD_MIRRORED,
};
use dataplane_user::kernel::{
    loader::{Dataplane, LoadOptions, MAP_INPUTS, MAP_OUTPUTS, MirrorMode},
    logs::LogReader,
};

use super::{Context, Failure};

/// `dataplane load`'s settings.
#[derive(clap::Args)]
pub struct Load {
    /// Service-facing interface: CPS inputs arrive and outputs leave here.
    #[arg(long)]
    pub interface: String,
    /// Link to the peer host, for mirror copies.
    #[arg(long)]
    pub peer_interface: Option<String>,
    /// The interface mirror frames are taken on (default: the peer
    /// interface). A standby's dataplane names the link from its source.
    #[arg(long)]
    pub mirror_from: Option<String>,
    /// Most bytes of a frame to log (0: whole frames).
    #[arg(long, default_value_t = 0)]
    pub snap_len: u32,
    /// Input log size in MiB (a power of two).
    #[arg(long, default_value_t = 64)]
    pub input_ring_mib: u32,
    /// Output log size in MiB (a power of two).
    #[arg(long, default_value_t = 16)]
    pub output_ring_mib: u32,
    /// Make mirror copies by XDP devmap broadcast to the peer interface and to
    /// this veth, behind which the service sits (default: TC clone).
    #[arg(long, requires = "deliver_mac")]
    pub deliver_interface: Option<String>,
    /// MAC address of the service side of the --deliver-interface veth.
    #[arg(long, value_parser = super::mac, requires = "deliver_interface")]
    pub deliver_mac: Option<[u8; 6]>,
}

pub fn load(cx: &Context, load: Load) -> Result<(), Failure> {
    let mirror_mode = match load.deliver_interface.zip(load.deliver_mac) {
        Some((deliver_interface, deliver_mac)) => MirrorMode::Devmap {
            deliver_interface,
            deliver_mac,
        },
        None => MirrorMode::Clone,
    };
    let options = LoadOptions {
        pin_root: cx.pin_root.clone(),
        peer_interface: load.peer_interface,
        mirror_from: load.mirror_from,
        snap_len: load.snap_len,
        input_ring_bytes: load.input_ring_mib << 20,
        output_ring_bytes: load.output_ring_mib << 20,
        mirror_mode,
        ..LoadOptions::new(load.interface)
    };
    let dataplane = Dataplane::load(&options)?;
    println!(
        "loaded on {} (pinned at {})",
        options.interface,
        dataplane.pin_root().display()
    );
    Ok(())
}

pub fn unload(cx: &Context) -> Result<(), Failure> {
    Dataplane::unload(&cx.pin_root)?;
    println!("unloaded; nothing left at {}", cx.pin_root.display());
    Ok(())
}

/// Prints the public key of the identity at `path`, made first if missing.
pub fn keygen(path: &std::path::Path) -> Result<(), Failure> {
    let (identity, made) = dataplane_user::peer::Identity::load_or_create(path)
        .map_err(|e| Failure::Local(e.into()))?;
    let what = if made { "made" } else { "kept" };
    eprintln!("{what} {}; list this host on its peers as:", path.display());
    println!("{}", identity.public());
    Ok(())
}

/// An input gate's mode, as `dataplane gate` names it.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum GateMode {
    /// Deliver every input.
    Deliver,
    /// Hold every input (logged, not delivered).
    Hold,
    /// Deliver inputs in sequence order, each once.
    Sequenced,
}

pub fn gate(cx: &Context, flow_id: u32, mode: GateMode, next_expected: u64) -> Result<(), Failure> {
    let mode = match mode {
        GateMode::Deliver => GATE_DELIVER_ALL,
        GateMode::Hold => GATE_HOLD_ALL,
        GateMode::Sequenced => GATE_SEQUENCED,
    };
    let gate = Gate {
        mode,
        next_expected,
        ..Default::default()
    };
    Dataplane::open(&cx.pin_root)?.set_gate(flow_id, gate)?;
    Ok(())
}

pub fn capture(
    cx: &Context,
    outputs: bool,
    count: Option<u64>,
    idle_secs: u64,
) -> Result<(), Failure> {
    let dataplane = Dataplane::open(&cx.pin_root)?;
    let ring = dataplane.open_log(if outputs { MAP_OUTPUTS } else { MAP_INPUTS })?;
    print_records(ring, count, Duration::from_secs(idle_secs))?;
    Ok(())
}

fn print_records(
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
                dataplane_common::RECORD_FLOODED => "flooded",
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
